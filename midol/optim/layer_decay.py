"""Layer-wise learning-rate decay (BEiT / Swin / MAE fine-tuning) as optimiser parameter groups.

Each backbone parameter gets a layer id ``0 .. num_layers - 1``: the patch embedding is 0, the
transformer blocks are numbered in order from 1, everything after the last block (final norm,
task head) is ``num_layers - 1``. Its learning rate is ``lr * decay ** (num_layers - 1 - id)``,
so the head learns at the full rate and earlier layers progressively slower.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _swin_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    # SimMIM's get_swin_layer with timm's layout: timm puts a stage's patch merging at the
    # *start* of stage i (``layers.i.downsample``), the original code at the end of stage i-1;
    # both give it the id of the last block of stage i-1.
    depths = [len(stage.blocks) for stage in model.layers]  # type: ignore[union-attr]
    num_layers = sum(depths) + 2
    ids: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] in ("patch_embed", "absolute_pos_embed", "mask_token"):
            ids[name] = 0
        elif parts[0] == "layers" and parts[2] == "downsample":
            ids[name] = sum(depths[: int(parts[1])])
        elif parts[0] == "layers" and parts[2] == "blocks":
            stage, block = int(parts[1]), int(parts[3])
            ids[name] = sum(depths[:stage]) + block + 1
        else:
            ids[name] = num_layers - 1
    return ids, num_layers


def _vit_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    # BEiT / MAE get_layer_id_for_vit.
    num_layers = len(model.blocks) + 2  # type: ignore[arg-type]
    ids: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] in ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "mask_token"):
            ids[name] = 0
        elif parts[0] == "blocks":
            ids[name] = int(parts[1]) + 1
        else:
            ids[name] = num_layers - 1
    return ids, num_layers


def _timm_group_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    # Any other timm model: its own fine-grained group matcher (stem = 0, blocks in order).
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))  # type: ignore[operator]
    num_layers = max(groups) + 2
    ids = {name: gid for gid, names in groups.items() for name in names}
    return {n: ids.get(n, num_layers - 1) for n, _ in model.named_parameters()}, num_layers


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter name of ``model`` and the number of ids (head included).

    Swin (``layers.i.blocks.j``) and ViT (``blocks.i``) follow the BEiT/SimMIM rules; other timm
    models use their ``group_matcher``. Raises ``ValueError`` for a model with neither."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.Sequential | nn.ModuleList) and len(layers) and hasattr(layers[0], "blocks"):
        return _swin_layer_ids(model)
    if isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList) and hasattr(model, "patch_embed"):
        return _vit_layer_ids(model)
    if hasattr(model, "group_matcher"):
        return _timm_group_layer_ids(model)
    raise ValueError(
        f"layer-wise lr decay does not know the layers of {type(model).__name__}; "
        "set layer_decay: 1.0"
    )


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names = getattr(model, "no_weight_decay", None)
    return set(names()) if callable(names) else set()


def _skip_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    # Norm weights, biases, position tables: no weight decay (DINO, BEiT, timm).
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def layer_decay_param_groups(
    backbone: nn.Module,
    heads: Iterable[nn.Module],
    weight_decay: float,
    layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW/SGD parameter groups with an ``lr_scale`` per group.

    ``heads`` (classifier, decoder) learn at scale 1. A frozen backbone (``requires_grad``
    False everywhere) contributes no group, which is how linear probing builds its optimiser.
    Group keys: ``params``, ``weight_decay``, ``lr_scale``, ``layer_id``, ``name``.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if trainable and layer_decay < 1:
        ids, num_layers = layer_ids(backbone)
    else:
        ids, num_layers = {n: 0 for n, _ in trainable}, 1
    skip = _no_weight_decay_names(backbone)
    groups: dict[tuple[int, bool], dict] = {}

    def add(name: str, param: nn.Parameter, layer_id: int, no_wd_names: set[str]) -> None:
        no_decay = _skip_decay(name, param, no_wd_names)
        key = (layer_id, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - 1 - layer_id),
                "layer_id": layer_id,
                "name": f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)

    for name, param in trainable:
        add(name, param, ids[name], skip)
    for head in heads:
        head_skip = _no_weight_decay_names(head)
        for name, param in head.named_parameters():
            if param.requires_grad:
                add(name, param, num_layers - 1, head_skip)
    if not groups:
        raise ValueError("no trainable parameter: the backbone is frozen and there is no head")
    return [groups[k] for k in sorted(groups)]
