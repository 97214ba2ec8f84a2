"""Export the teacher backbone of a pre-training run as safetensors plus a JSON description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import midol
from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD

BACKBONE_FILE = "teacher_backbone.safetensors"
META_FILE = "teacher_backbone.json"


def export_backbone(
    state_dict: dict[str, torch.Tensor],
    hparams: dict[str, Any],
    out_dir: str | Path,
    image_size: int | None = None,
    source: str | None = None,
) -> Path:
    """Write ``state_dict`` (a timm backbone's) to ``out_dir/teacher_backbone.safetensors`` and
    a JSON with what is needed to rebuild it: ``timm.create_model(model, num_classes=0,
    **overrides)`` then ``load_state_dict(..., strict=True)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = out / BACKBONE_FILE
    save_file(tensors, str(path), metadata={"format": "pt", "timm_model": hparams["backbone"]})
    overrides = dict(hparams.get("backbone_kwargs") or {})
    meta = {
        "timm_model": hparams["backbone"],
        "overrides": overrides,
        "num_classes": 0,
        "image_size": image_size or overrides.get("img_size", 224),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "RGB scaled to [0, 1], then (x - mean) / std",
        "source": source,
        "midol_version": midol.__version__,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def export_module(module: Any, out_dir: str | Path, image_size: int | None = None, source: str | None = None) -> Path:
    """Export the teacher backbone of a live :class:`~midol.methods.PretrainModule`."""
    return export_backbone(
        module.teacher["backbone"].state_dict(), dict(module.hparams), out_dir, image_size, source
    )


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, image_size: int | None = None) -> Path:
    """Export the teacher backbone from a pre-training checkpoint (loaded with weights_only=True)."""
    from midol.models.pretrained import read_pretrain_checkpoint

    state, hparams = read_pretrain_checkpoint(ckpt_path)
    return export_backbone(state, hparams, out_dir, image_size, source=str(ckpt_path))
