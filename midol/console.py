"""What a run prints: the user's information, not library advertisements and known-harmless
warnings. Called by the ``midol`` command only (a library user keeps every warning)."""

from __future__ import annotations

import logging
import re
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
    """Lightning's product tips, and its accelerator banner lines for hardware that is absent
    ("TPU available: False, using: 0 TPU cores" on every CPU run); a GPU that is there is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.getMessage())
        if text.startswith("💡 Tip"):
            return False
        return not re.match(r"^[A-Z]{3} available: False", text)


def quiet_known_noise() -> None:
    """Silence Lightning's product tips and the warnings listed in ``_KNOWN_WARNINGS``."""
    for pattern, _why in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def version_line() -> str:
    """``midol X (torch Y, lightning Z, timm W)``, read without importing those libraries (the
    10 s of ``import lightning``): from the modules when already imported, else their
    installed metadata (torch: its ``version.py``, which keeps the build, e.g. ``+cu130``)."""
    import midol

    return (f"midol {midol.__version__} (torch {_installed_version('torch')}, lightning "
            f"{_installed_version('lightning')}, timm {_installed_version('timm')})")


def _installed_version(name: str) -> str:
    """The version of package ``name`` without importing it; ``not installed`` when absent."""
    import importlib.metadata
    import importlib.util
    import re
    import sys
    from pathlib import Path

    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return str(module.__version__)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:  # torch writes its full version (with the CUDA build) into torch/version.py
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
