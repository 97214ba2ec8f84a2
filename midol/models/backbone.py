"""Backbone factory over timm: pooled features out, optional local init checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from midol.io.weights import load_state_dict_file

DEFAULT_BACKBONE = "swin_base_patch4_window7_224"

# Containers that checkpoints of DINO, solo-learn, Lightning and the Swin release nest weights in.
_NESTED_KEYS = ("state_dict", "model", "teacher", "module")
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "encoder.", "model.")


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    overrides: dict[str, Any] | None = None,
    init_checkpoint: str | Path | None = None,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Create a timm model that returns pooled features (``num_classes=0``).

    ``overrides`` go to ``timm.create_model`` (tests build a tiny Swin through this same path).
    The model accepts any input size, so 96 px local views run through a 224 px Swin (see
    :func:`enable_dynamic_size`). Nothing is downloaded: ``init_checkpoint`` is a local file.
    """
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **(overrides or {}))
    except RuntimeError as err:  # timm raises RuntimeError for an unknown name
        raise ValueError(f"unknown timm model {name!r}: {err}") from err
    enable_dynamic_size(model)
    if init_checkpoint is not None:
        load_backbone_weights(model, init_checkpoint)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def enable_dynamic_size(model: nn.Module) -> nn.Module:
    """Let a timm model run at any input size; for Swin, with correct attention masks.

    Turning off the patch embedding's size check is not enough: timm stores each shifted-window
    block's attention mask for ``img_size`` at construction, and at another size that mask no
    longer fits the windows (a crash, or for some batch sizes masks applied to the wrong
    windows). ``dynamic_mask`` makes every block build the mask for the input it gets, as
    ``timm.create_model(..., strict_img_size=False)`` does; the weights are unchanged."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "strict_img_size"):
        patch_embed.strict_img_size = False
    for module in model.modules():
        if hasattr(module, "dynamic_mask"):
            module.dynamic_mask = True
            module.attn_mask = None  # the stored mask is never read again: free it
    return model


def _unwrap(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in _NESTED_KEYS:
        if key in state and isinstance(state[key], dict):
            return _unwrap(state[key])
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise ``model`` from a local checkpoint (safetensors, or a torch file loaded with
    ``weights_only=True``). Classifier heads are dropped; timm's own conversion for the
    architecture (e.g. the original Microsoft Swin release) is applied when it has one.
    Raises when no tensor of the file matches the model."""
    state = _strip_prefixes(_unwrap(load_state_dict_file(path)))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and not k.startswith("head")}
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape]
    if mismatched:
        raise ValueError(
            f"{path}: shapes differ from the model for {len(mismatched)} tensors, e.g. "
            f"{mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}"
        )
    if not state:
        raise ValueError(f"{path}: no tensor matches the backbone's parameter names")
    missing = [k for k in own if k not in state and "relative_position_index" not in k]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} backbone tensors are missing from the checkpoint, "
            f"e.g. {missing[:3]}"
        )
    model.load_state_dict(state, strict=False)
