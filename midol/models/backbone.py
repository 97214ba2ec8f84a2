"""Backbone factory over timm: pooled features out, optional local init checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from midol.errors import UsageError
from midol.io.weights import load_state_dict_file
from midol.models.weight_maps import LoadReport, check_report, convert_state_dict

DEFAULT_BACKBONE = "swin_base_patch4_window7_224"
# timm's one prefix that reads a local model folder; every other prefix (hf-hub:, hf_hub:, any
# case) or a bare repo id (timm/resnet18.a1_in1k) is, or looks like, a Hugging Face Hub download.
_LOCAL_SOURCE = "local-dir"


class HubModelNameError(UsageError):
    """A backbone name that timm would fetch from the Hugging Face Hub (exit 2)."""


def check_local_model_name(name: str, origin: str | None = None) -> None:
    """:class:`HubModelNameError` unless ``name`` is a timm registry name or ``local-dir:``.

    ``timm.create_model("hf-hub:org/repo", pretrained=False)`` still downloads the repo's
    ``config.json``, so a name read from a checkpoint or an export JSON could make midol reach
    the network (and fetch what the file chooses). Checked before timm sees the name; nothing
    is fetched. ``origin`` (the file the name came from) starts the message."""
    text = str(name).strip()
    source, sep, _ = text.partition(":")
    if sep:
        remote = source.strip().lower() != _LOCAL_SOURCE
    else:
        remote = "/" in text or "\\" in text
    if remote:
        where = f"{origin}: " if origin else ""
        raise HubModelNameError(
            f"{where}backbone {text!r} is a Hugging Face Hub (or URL) spelling, which timm would "
            "download from; midol never downloads: use the timm registry name (e.g. "
            "'swin_base_patch4_window7_224') with local weights (init_checkpoint), or a "
            "'local-dir:' folder")


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    overrides: dict[str, Any] | None = None,
    init_checkpoint: str | Path | None = None,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Create a timm model that returns pooled features (``num_classes=0``).

    ``overrides`` go to ``timm.create_model`` (tests build a tiny Swin through this same path).
    The model accepts any input size, so 96 px local views run through a 224 px Swin (see
    :func:`enable_dynamic_size`). Nothing is downloaded: ``init_checkpoint`` is a local file,
    and a Hub name is refused (:func:`check_local_model_name`).
    """
    check_local_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **(overrides or {}))
    except RuntimeError as err:  # timm raises RuntimeError for an unknown name
        raise ValueError(f"unknown timm model {name!r}: {err}") from err
    enable_dynamic_size(model)
    if init_checkpoint is not None:
        load_backbone_weights(model, init_checkpoint)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # timm models define it
    return model


def enable_dynamic_size(model: nn.Module) -> nn.Module:
    """Let a timm model run at any input size; for Swin, with correct attention masks.

    Turning off the patch embedding's size check is not enough: timm stores each shifted-window
    block's attention mask for ``img_size`` at construction, and at another size that mask no
    longer fits the windows (a crash, or for some batch sizes masks applied to the wrong
    windows). ``dynamic_mask`` makes every block build the mask for the input it gets, as
    ``timm.create_model(..., strict_img_size=False)`` does; the weights are unchanged. Each
    block then builds its mask once per input size (:class:`CachedAttnMask`), not per forward."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "strict_img_size"):
        patch_embed.strict_img_size = False
    for module in model.modules():
        if hasattr(module, "dynamic_mask"):
            block: Any = module  # a timm Swin block: attributes mypy cannot see on nn.Module
            block.dynamic_mask = True
            block.attn_mask = None  # the stored mask is never read again: free it
            if _builds_shifted_window_masks(module):
                block.get_attn_mask = CachedAttnMask(module)
    return model


def _builds_shifted_window_masks(module: nn.Module) -> bool:
    """A timm Swin block (v1, v2, v2-cr) whose ``get_attn_mask`` is not yet cached."""
    return (
        callable(getattr(type(module), "get_attn_mask", None))
        and hasattr(module, "window_size")
        and hasattr(module, "shift_size")
        and not isinstance(module.__dict__.get("get_attn_mask"), CachedAttnMask)
    )


class CachedAttnMask:
    """A Swin block's ``get_attn_mask``, built once per input size and then looked up.

    With ``dynamic_mask`` timm builds the shifted-window mask in every forward of every block
    (a Python loop of slice assignments: 2225 aten ops per Swin-B forward at 224 px instead of
    1686 with this cache, timm 1.0.31). The mask depends only on
    the padded feature size, the block's window and shift, and the device and dtype of the
    features, so it is kept in a small dict on the block (``block.get_attn_mask.cache``), keyed
    by those. It is not a buffer: ``state_dict`` keys stay those of the plain timm model. The
    mask itself is the one timm's own ``get_attn_mask`` returns (looked up on the block's class
    at each build), so the numerics are unchanged. Calls without ``x`` (timm's static mask)
    and calls while ``torch.compile`` traces go straight to timm's function.
    """

    max_entries = 32  # FIFO beyond this: inference over many sizes must not grow it unboundedly

    def __init__(self, block: nn.Module):
        self.block: Any = block
        self.cache: dict[tuple[Any, ...], torch.Tensor | None] = {}

    def _build(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        mask: torch.Tensor | None = type(self.block).get_attn_mask(self.block, *args, **kwargs)
        return mask

    def __call__(
        self,
        x: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        if x is None or torch.compiler.is_compiling():
            return self._build(x, device=device, dtype=dtype)
        block = self.block
        key = (int(x.shape[1]), int(x.shape[2]), x.device, x.dtype,
               tuple(block.window_size), tuple(block.shift_size))
        try:
            return self.cache[key]
        except KeyError:
            pass
        # An ordinary tensor even when first built under inference_mode (Lightning's
        # validation), so that later training steps may use it; it never needs a gradient.
        with torch.inference_mode(False), torch.no_grad():
            mask = self._build(x)  # timm reads only the size, device and dtype of x
        if len(self.cache) >= self.max_entries:
            del self.cache[next(iter(self.cache))]
        self.cache[key] = mask
        return mask


def load_backbone_weights(
    model: nn.Module,
    path: str | Path,
    layout: str = "auto",
    min_loaded: float = 1.0,
) -> LoadReport:
    """Initialise ``model`` from a local checkpoint (safetensors, or a torch file loaded with
    ``weights_only=True``) written in ``layout`` (``auto``: read from the keys; see
    :mod:`midol.models.weight_maps`). Classifier heads and pre-training-only tensors are
    ignored; position embeddings and Swin relative-position tables of another size are
    resampled (timm's helpers). Returns the :class:`~midol.models.weight_maps.LoadReport`.

    Raises when a tensor's shape cannot be made to fit, when nothing matches, or when less
    than ``min_loaded`` of the backbone's tensors come from the file (default 1.0: every
    tensor must, the strict behaviour fine-tuning relies on)."""
    state, report = convert_state_dict(load_state_dict_file(path), model, layout, str(path))
    check_report(report, min_loaded)
    model.load_state_dict(state, strict=False)
    return report
