"""What a run prints: the user's information, not library advertisements and known-harmless
warnings. Called by the ``midol`` command only (a library user keeps every warning)."""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is harmless for midol)
_KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (r".*isinstance\(treespec, LeafSpec\).*", "a deprecation inside Lightning's own pytree use"),
    (r"Found \d+ module\(s\) in eval mode at the start of training.*",
     "midol keeps EMA teachers, frozen experts and linear-probe backbones in eval mode on purpose"),
    (r"LightningCLI's args parameter is intended to run from within Python.*",
     "the midol command passes its composed arguments to LightningCLI"),
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence Lightning's product tips and the warnings listed in ``_KNOWN_WARNINGS``."""
    for pattern, _why in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def version_line() -> str:
    """``midol X (torch Y, lightning Z, timm W)``."""
    import lightning
    import timm
    import torch

    import midol

    return (f"midol {midol.__version__} (torch {torch.__version__}, lightning {lightning.__version__}, "
            f"timm {timm.__version__})")
