"""Layer-wise lr decay groups (BEiT/SimMIM rules for Swin) and the fine-tuning lr schedules."""

from __future__ import annotations

import math

import pytest
from torch import nn

from midol.models import build_backbone
from midol.optim.layer_decay import layer_decay_param_groups, layer_ids
from midol.optim.schedules import warmup_cosine_schedule
from midol.tasks.base import poly_schedule

SWIN = "swin_tiny_patch4_window7_224"
DEPTHS = dict(img_size=32, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)


def test_swin_layer_ids_follow_stage_and_block_order():
    model = build_backbone(SWIN, DEPTHS)
    ids, num_layers = layer_ids(model)
    assert num_layers == 8 + 2
    assert ids["patch_embed.proj.weight"] == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["layers.0.blocks.1.mlp.fc2.bias"] == 2
    # Patch merging before stage 1 = end of stage 0 in the original Swin: id of stage 0's last block.
    assert ids["layers.1.downsample.reduction.weight"] == 2
    assert ids["layers.1.blocks.0.norm1.weight"] == 3
    assert ids["layers.2.blocks.1.attn.proj.weight"] == 6
    assert ids["layers.3.downsample.norm.weight"] == 6
    assert ids["layers.3.blocks.1.mlp.fc1.weight"] == 8
    assert ids["norm.weight"] == 9


def test_vit_and_other_timm_models_get_ids():
    vit = build_backbone("vit_tiny_patch16_224", dict(img_size=32, depth=3))
    ids, n = layer_ids(vit)
    assert n == 5 and ids["cls_token"] == 0 and ids["blocks.2.mlp.fc1.weight"] == 3 and ids["norm.weight"] == 4
    resnet = build_backbone("resnet18")
    ids, n = layer_ids(resnet)
    assert ids["conv1.weight"] == 0 and ids["layer4.1.conv2.weight"] > ids["layer1.0.conv1.weight"]


def test_groups_scale_lr_per_layer_and_skip_decay_on_norms_biases_and_tables():
    model = build_backbone(SWIN, DEPTHS)
    head = nn.Linear(model.num_features, 3)
    groups = layer_decay_param_groups(model, [head], weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    ids, n = layer_ids(model)
    assert len(by_param) == sum(1 for _ in model.parameters()) + 2  # every parameter once
    for name, param in named.items():
        group = by_param[id(param)]
        assert group["lr_scale"] == pytest.approx(0.5 ** (n - 1 - ids[name])), name
        no_decay = param.ndim <= 1 or "relative_position_bias_table" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert by_param[id(head.weight)]["lr_scale"] == 1.0 and by_param[id(head.weight)]["weight_decay"] == 0.05
    assert by_param[id(head.bias)]["weight_decay"] == 0.0
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.5 ** 9)


def test_frozen_backbone_gives_head_only_groups():
    model = build_backbone(SWIN, DEPTHS).requires_grad_(False)
    head = nn.Linear(model.num_features, 3)
    groups = layer_decay_param_groups(model, [head], weight_decay=0.0, layer_decay=0.65)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == 2 and all(g["lr_scale"] == 1.0 for g in groups)


def test_bad_layer_decay_is_rejected():
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(build_backbone(SWIN, DEPTHS), [], 0.05, layer_decay=1.5)


def test_warmup_then_cosine_and_poly_values():
    # 10 warm-up steps to 1e-3, then cosine to 1e-6 over 90 steps
    assert warmup_cosine_schedule(0, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-4)
    assert warmup_cosine_schedule(9, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-3)
    mid = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 45 / 90)) / 2
    assert warmup_cosine_schedule(55, 100, 10, 1e-3, 1e-6) == pytest.approx(mid)
    assert poly_schedule(4, 100, 5, 2e-5, 0.0) == pytest.approx(2e-5)
    assert poly_schedule(5 + 38, 100, 5, 2e-5, 0.0, power=1.0) == pytest.approx(2e-5 * (1 - 38 / 95))
    assert poly_schedule(5 + 38, 100, 5, 2e-5, 0.0, power=0.9) == pytest.approx(2e-5 * (1 - 38 / 95) ** 0.9)
    assert poly_schedule(100, 100, 5, 2e-5, 0.0) == 0.0

