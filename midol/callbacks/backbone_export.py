"""Write the backbones a method names as worth keeping when training ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from midol.legacy import module_getattr
from midol.methods.export import export_method
from midol.methods.interfaces import Pretrained


class ExportBackbone(L.Callback):
    """After ``fit``, save ``dirpath/<part>.safetensors`` plus its JSON for every part (default:
    the method's first ``export_modules()`` entry, M-IDoL's ``teacher_backbone``). Warns when
    the model has not trained (``max_steps: 0``, or every step skipped): the files then hold its
    initial weights.

    Args:
        dirpath: Output folder (default: the trainer's ``default_root_dir``).
        parts: Export names to write (default: the method's first).
    """

    def __init__(self, dirpath: str | None = None, parts: list[str] | None = None):
        self.dirpath = dirpath
        self.parts = parts

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, Pretrained):
            raise ValueError(f"{type(pl_module).__name__} exports no backbone (no export_modules())")
        size = getattr(trainer.datamodule, "global_size", None)
        paths = export_method(pl_module, self.dirpath or trainer.default_root_dir, self.parts,
                              image_size=size)
        for path in paths:
            rank_zero_info(f"backbone exported to {path}")


__getattr__ = module_getattr("midol.callbacks.backbone_export")  # ExportTeacherBackbone (<= 0.1.0)
