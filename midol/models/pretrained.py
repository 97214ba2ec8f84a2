"""Backbones for downstream tasks, from (a) a midol pre-training checkpoint (the teacher),
(b) an exported ``.safetensors`` backbone with its JSON, or (c) any timm model (random init or
local weights). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from midol.models.backbone import build_backbone
from midol.models.checkpoint_io import load_state_dict_file

CheckpointFormat = Literal["auto", "midol", "exported", "timm"]
TEACHER_PREFIX = "teacher.backbone."


@dataclass
class BackboneInfo:
    """What was loaded: the timm recipe (``timm.create_model(model, num_classes=0, **overrides)``),
    the weights' origin and, when the file records it, the pre-training image size."""

    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = "random init"
    image_size: int | None = None


def read_pretrain_checkpoint(
    path: str | Path, prefix: str = TEACHER_PREFIX
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Backbone tensors under ``prefix`` (teacher by default) and the hyper-parameters of a
    midol pre-training checkpoint, read with ``weights_only=True``."""
    ckpt = load_state_dict_file(path)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(
            f"{path} is not a midol pre-training checkpoint (no 'state_dict'/'hyper_parameters'); "
            "for other weight files use the timm format (init_format: timm) and name the backbone"
        )
    hparams = dict(ckpt["hyper_parameters"])
    if "backbone" not in hparams:
        raise ValueError(f"{path}: hyper_parameters has no 'backbone' (timm model name)")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no backbone tensors under '{prefix}*'")
    return state, hparams


def detect_format(checkpoint: str | Path | None) -> Literal["midol", "exported", "timm"]:
    """``None`` -> timm (random init); ``*.ckpt`` -> midol; ``*.safetensors`` with a JSON of the
    same stem beside it -> exported; anything else -> timm (local weights for a named model)."""
    if checkpoint is None:
        return "timm"
    path = Path(checkpoint)
    if path.suffix == ".ckpt":
        return "midol"
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return "exported"
    return "timm"


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the backbone built from its recipe: {err}") from err


def _check_name(requested: str | None, recorded: str, path: str | Path) -> None:
    if requested is not None and requested != recorded:
        raise ValueError(
            f"{path} holds a {recorded!r} backbone but backbone={requested!r} was requested; "
            "leave backbone unset (null) to take it from the file"
        )


def load_backbone(
    backbone: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_format: CheckpointFormat = "auto",
    checkpoint_prefix: str = TEACHER_PREFIX,
    grad_checkpointing: bool = False,
) -> tuple[nn.Module, BackboneInfo]:
    """Build a pooled-feature timm backbone and load its weights.

    * ``midol``: architecture from the checkpoint's ``hyper_parameters`` (``backbone``,
      ``backbone_kwargs``), weights ``teacher.backbone.*``, loaded strictly.
    * ``exported``: architecture from the JSON next to the ``.safetensors``, loaded strictly.
    * ``timm``: ``backbone`` names the model; ``checkpoint`` (optional) is a local weight file
      loaded like a pre-training init (prefixes stripped, classifier dropped).

    ``backbone_kwargs`` are added to the recorded overrides (e.g. ``drop_path_rate: 0.1``);
    keys that change the architecture make the strict load fail with a clear error.
    """
    fmt = detect_format(checkpoint) if checkpoint_format == "auto" else checkpoint_format
    user_kwargs = dict(backbone_kwargs or {})
    if fmt == "timm":
        if backbone is None:
            raise ValueError("name the timm model (backbone: ...) when no midol checkpoint is given")
        model = build_backbone(backbone, user_kwargs, checkpoint, grad_checkpointing)
        source = f"timm weights {checkpoint}" if checkpoint else "random init"
        return model, BackboneInfo(backbone, user_kwargs, source, user_kwargs.get("img_size"))
    if checkpoint is None:
        raise ValueError(f"weights format {fmt!r} needs a weights file (init_checkpoint)")
    path = Path(checkpoint)
    if fmt == "midol":
        state, hparams = read_pretrain_checkpoint(path, checkpoint_prefix)
        name, overrides = hparams["backbone"], dict(hparams.get("backbone_kwargs") or {})
        image_size = overrides.get("img_size")
    elif fmt == "exported":
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: its description {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        name, overrides = meta["timm_model"], dict(meta.get("overrides") or {})
        image_size = meta.get("image_size")
        state = load_state_dict_file(path)
    else:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    _check_name(backbone, name, path)
    overrides.update(user_kwargs)
    model = build_backbone(name, overrides, grad_checkpointing=grad_checkpointing)
    _load_strict(model, state, path)
    return model, BackboneInfo(name, overrides, f"{fmt} {path}", image_size)
