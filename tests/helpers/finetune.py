"""Shared pieces of the downstream tests: a real (tiny) pre-training checkpoint, small trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.helpers.tiny import TINY_SWIN, tiny_datamodule, tiny_module

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "sample_data"
SWIN = "swin_tiny_patch4_window7_224"
# Fine-tuning tests run the tiny Swin at its native 32 px.
SIZE = int(TINY_SWIN["img_size"])
_CACHE: dict[str, Path] = {}


def pretrain_checkpoint(tmp_path_factory: Any) -> Path:
    """A midol pre-training checkpoint after 2 optimiser steps on real sample images (so the EMA
    teacher differs from the student); built once per test session."""
    if "ckpt" not in _CACHE:
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("pretrain")
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        )
        trainer.fit(tiny_module(), tiny_datamodule(batch_size=8))
        path = out / "pretrain.ckpt"
        trainer.save_checkpoint(path)
        _CACHE["ckpt"] = path
    return _CACHE["ckpt"]


def quick_trainer(root: Path, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def tiny_backbone_args(**overrides: Any) -> dict[str, Any]:
    """Random-init tiny Swin (same timm factory as Swin-B)."""
    kwargs: dict[str, Any] = dict(backbone=SWIN, backbone_kwargs=dict(TINY_SWIN))
    kwargs.update(overrides)
    return kwargs
