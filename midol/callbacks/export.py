"""Write the teacher backbone as safetensors when training ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from midol.export import export_module


class ExportTeacherBackbone(L.Callback):
    """After ``fit``, save ``dirpath/teacher_backbone.safetensors`` plus its JSON description
    (the only part of a pre-training run that downstream tasks use). ``dirpath`` defaults to
    the trainer's ``default_root_dir``."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        size = getattr(datamodule, "global_size", None)
        path = export_module(pl_module, self.dirpath or trainer.default_root_dir, image_size=size)
        rank_zero_info(f"teacher backbone exported to {path}")
