"""Backbones for downstream tasks, from (a) a midol pre-training checkpoint (the teacher),
(b) an exported ``.safetensors`` backbone with its JSON, or (c) any timm model (random init or
local weights). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from midol.io.weights import load_state_dict_file
from midol.methods.export import read_export_meta
from midol.methods.interfaces import BackboneExport
from midol.models.backbone import build_backbone, check_local_model_name

CheckpointFormat = Literal["auto", "midol", "exported", "timm"]
TEACHER_PREFIX = "teacher.backbone."  # midol <= 0.1.0: init_prefix named a state-dict prefix


@dataclass
class BackboneInfo:
    """What was loaded: the timm recipe (``timm.create_model(model, num_classes=0, **overrides)``),
    the weights' origin and, when the file records it, the pre-training image size."""

    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = "random init"
    image_size: int | None = None
    dex: dict[str, Any] | None = None  # DEX routed-experts recipe, when the backbone has one


def part_from_prefix(prefix: str | None) -> str | None:
    """The export part an old-style state-dict prefix names (``teacher.backbone.`` ->
    ``teacher_backbone``), None for None."""
    return None if prefix is None else prefix.strip(".").replace(".", "_")


def read_method_backbone(path: str | Path, part: str | None = None) -> tuple[dict[str, torch.Tensor], BackboneExport]:
    """Backbone tensors and recipe of export ``part`` (default: the method's first) of a midol
    training checkpoint, through the method's own ``export_modules()``."""
    from midol.methods.loading import load_method

    method = load_method(path)
    parts = method.export_modules()
    name = part or next(iter(parts))
    if name not in parts:
        raise ValueError(f"{path}: no backbone part {name!r}; its method exports {', '.join(parts)}")
    spec = parts[name]
    return {k: v.detach().clone() for k, v in spec.module.state_dict().items()}, spec


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


def with_dex_layers(model: nn.Module, dex: dict[str, Any] | None) -> nn.Module:
    """Inject the DEX layers a routed-experts export records (for fine-tuning: no routing noise,
    no director update; the experts and router train, top-k routing as in pre-training)."""
    if not dex:
        return model
    from midol.models.dex import inject_dex

    recipe = dict(dex)
    blocks = recipe.pop("blocks")
    for layer in inject_dex(model, blocks, **recipe):
        layer.noise_std = 0.0
        layer.update_director = False
        layer.compute_director_out = False
    return model


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
    part: str | None = None,
    grad_checkpointing: bool = False,
    dex_mode: Literal["director", "experts"] | None = None,
) -> tuple[nn.Module, BackboneInfo]:
    """Build a pooled-feature timm backbone and load its weights.

    * ``midol``: a training checkpoint; the method rebuilt from it names its backbones
      (``export_modules()``): ``part`` (default: its first, M-IDoL's ``teacher_backbone``),
      with that part's timm recipe, loaded strictly.
    * ``exported``: architecture from the JSON next to the ``.safetensors``, loaded strictly.
    * ``timm``: ``backbone`` names the model; ``checkpoint`` (optional) is a local weight file
      loaded like a pre-training init (prefixes stripped, classifier dropped).

    ``backbone_kwargs`` are added to the recorded overrides (e.g. ``drop_path_rate: 0.1``);
    keys that change the architecture make the strict load fail with a clear error.

    ``dex_mode`` picks a DEX checkpoint's ``director_backbone`` or ``experts_backbone`` (and
    checks that an exported file is that kind).
    """
    fmt = detect_format(checkpoint) if checkpoint_format == "auto" else checkpoint_format
    if dex_mode is not None:
        if dex_mode not in ("director", "experts"):
            raise ValueError(f"dex_mode must be 'director' or 'experts', got {dex_mode!r}")
        if fmt == "timm":
            raise ValueError(f"dex_mode={dex_mode!r} needs a DEX checkpoint or export, got "
                             f"{checkpoint or 'random init'}")
        wanted = f"{dex_mode}_backbone"
        if fmt == "midol":
            if part is not None and part != wanted:
                raise ValueError(f"init_part={part!r} contradicts dex_mode={dex_mode!r} ({wanted})")
            part = wanted
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
        state, spec = read_method_backbone(path, part)
        name, overrides = spec.timm_model, dict(spec.overrides)
        image_size = overrides.get("img_size")
        dex = spec.dex
    elif fmt == "exported":
        meta = read_export_meta(path)
        name, overrides = meta["timm_model"], dict(meta.get("overrides") or {})
        check_local_model_name(name, str(path.with_suffix(".json")))  # the JSON chose it
        image_size = meta.get("image_size")
        state = load_state_dict_file(path)
        dex = meta.get("dex")
        if dex_mode is not None and (dex_mode == "experts") != bool(dex):
            kind = "a routed-experts DEX backbone" if dex else "a dense backbone (no DEX layers)"
            raise ValueError(f"{path} holds {kind}, not dex_mode={dex_mode!r}; export the other "
                             "part with `midol export CKPT --parts director_backbone|experts_backbone`")
    else:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    _check_name(backbone, name, path)
    overrides.update(user_kwargs)
    model = with_dex_layers(build_backbone(name, overrides, grad_checkpointing=grad_checkpointing), dex)
    _load_strict(model, state, path)
    return model, BackboneInfo(name, overrides, f"{fmt} {path}", image_size, dex)
