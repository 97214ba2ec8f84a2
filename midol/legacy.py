"""Old import paths and class paths, resolved by name (not imported) so that a module that moved
up the layers (docs/architecture.md) can still be reached from where it used to be.

Every entry maps an old dotted name to ``"new.module:Name"``; using one warns once with the
version that renamed it and the version that removes it. Checkpoints and configs store class
paths as text, so they go through :func:`resolve_class_path` too and keep loading.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

RENAMED_IN = "0.2"
REMOVED_IN = "0.4"

# old module -> the module that now holds everything it held
MOVED_MODULES: dict[str, str] = {
    "midol.io.export": "midol.methods.export",
    "midol.io.medmix_export": "midol.fusion.export",
    "midol.methods.medmix": "midol.fusion.module",
    "midol.methods.medmix_experts": "midol.fusion.experts",
    "midol.analysis.cluster_metrics": "midol.utils.cluster_metrics",
}
# old module -> {old attribute: "new.module:Name"}, for packages that still exist
MOVED_NAMES: dict[str, dict[str, str]] = {
    "midol.methods": {
        "MedMIX": "midol.fusion.module:MedMIX",
        "ClassificationModule": "midol.tasks:ClassificationModule",
        "FinetuneModule": "midol.tasks:FinetuneModule",
        "MultiLabelModule": "midol.tasks:MultiLabelModule",
        "SegmentationModule": "midol.tasks:SegmentationModule",
    },
    "midol.callbacks": {"ExportTeacherBackbone": "midol.callbacks.backbone_export:ExportBackbone"},
    "midol.callbacks.backbone_export": {
        "ExportTeacherBackbone": "midol.callbacks.backbone_export:ExportBackbone"},
    "midol.losses.dex": {"group_ema_": "midol.models.ema:group_ema_",
                         **{n: f"midol.losses.mae:{n}" for n in (
                             "patchify", "unpatchify", "masked_mae_loss")}},
    "midol.io": {"BackboneExport": "midol.methods.interfaces:BackboneExport",
                 **{n: f"midol.methods.export:{n}" for n in (
                     "export_backbone", "export_checkpoint", "export_method")}},
}


def _target(old_module: str, name: str) -> str | None:
    if old_module in MOVED_MODULES:
        return f"{MOVED_MODULES[old_module]}:{name}"
    return MOVED_NAMES.get(old_module, {}).get(name)


def load(target: str) -> Any:
    """The object ``"module:Name"`` names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def module_getattr(old_module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module`` that resolves its moved names with a
    ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        target = _target(old_module, name)
        if target is None or (old_module in MOVED_MODULES and name.startswith("__")):
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        new = target.replace(":", ".")
        warnings.warn(f"{old_module}.{name} moved to {new} in midol {RENAMED_IN}; the old name goes "
                      f"in {REMOVED_IN}", DeprecationWarning, stacklevel=2)
        return load(target)

    return __getattr__


def resolve_class_path(class_path: str) -> str:
    """The current spelling of a class path read from a checkpoint or a config (unchanged when
    it did not move)."""
    module, _, name = class_path.rpartition(".")
    if module in MOVED_MODULES:
        return f"{MOVED_MODULES[module]}.{name}"
    target = MOVED_NAMES.get(module, {}).get(name)
    return target.replace(":", ".") if target else class_path
