"""Continued pre-training from released weights (issue 29 item 1): tiny stand-ins written in each
source's own key layout and nesting (tests/helpers/released_weights.py) load through the recipe
(midol.models.weight_maps + load_backbone_weights + the methods' init_checkpoint) into the same
tensors, with exact report counts; resampled tensors equal timm's own functions' output."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

from midol.models import build_backbone, load_backbone_weights
from midol.models.weight_maps import InitWeightsError, LoadReport
from tests.helpers.dex import tiny_dex
from tests.helpers.released_weights import (
    dinov2_hub,
    dinov2_hub_registers,
    dinov3_release,
    mae_finetuned,
    mae_pretrain,
    save,
    state,
    swin_ms_release,
    tiny_model,
)
from tests.helpers.tiny import tiny_datamodule, tiny_module

SWIN = "swin_tiny_patch4_window7_224"
# stage 0 has a shifted block (depth 2 at 8 x 8 patches, window 2): the release stores its mask
SWIN_ARCH = dict(img_size=32, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2)
DINOV2 = "vit_small_patch14_dinov2"
DINOV2_ARCH = dict(embed_dim=32, depth=4, num_heads=2)
VIT_ARCH = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)  # tests/helpers/dex.TINY_VIT


def assert_same_tensors(model: torch.nn.Module, expected: dict[str, torch.Tensor],
                        skip: frozenset[str] | set[str] = frozenset()) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        if k not in skip:
            assert torch.equal(got[k], v), k


def test_microsoft_swin_release_loads_every_tensor_under_timm_names(tmp_path):
    source = tiny_model(SWIN, **SWIN_ARCH)
    release = swin_ms_release(source)
    path = save(release, tmp_path / "swin_base_patch4_window7_224_22k.pth")
    model = build_backbone(SWIN, SWIN_ARCH)
    report = load_backbone_weights(model, path)
    assert_same_tensors(model, state(source))
    # and timm's own conversion of the release gives the same tensors
    timm_view = swin_filter(dict(release["model"]), model)
    assert all(torch.equal(timm_view[k], v) for k, v in model.state_dict().items())
    n = len(model.state_dict())
    assert report.layout == "swin_ms"
    assert report.counts() == {"loaded": n, "reshaped": 0, "random_init": 0, "ignored": 2 + 5 + 1}
    renamed = {k: v for k, v in report.loaded.items() if k != v}
    assert renamed["layers.1.downsample.reduction.weight"] == "layers.0.downsample.reduction.weight"
    assert len(renamed) == 3 * 3  # norm weight, bias, reduction of 3 patch-merging layers
    assert report.ignored["head.weight"] == "classifier head"
    assert report.ignored["layers.0.blocks.1.attn_mask"] == "buffer the model recomputes"
    assert sum(v == "buffer the model recomputes" for v in report.ignored.values()) == 5 + 1


def test_swin_window_change_resizes_relative_position_tables_with_timms_helper(tmp_path):
    source = tiny_model(SWIN, **SWIN_ARCH)
    path = save(swin_ms_release(source), tmp_path / "release.pth")
    model = build_backbone(SWIN, {**SWIN_ARCH, "window_size": 4})  # 4 x 4 windows where 8 x 8 patches
    report = load_backbone_weights(model, path)
    src = state(source)
    tables = {k for k, v in model.state_dict().items()
              if k.endswith("relative_position_bias_table") and v.shape != src[k].shape}
    assert set(report.reshaped) == tables and len(tables) == 3  # stage 0 (2 blocks) and 1: window 4
    for k in tables:
        block = model.get_submodule(k[: -len(".relative_position_bias_table")])
        expected = resize_rel_pos_bias_table(src[k], new_window_size=block.window_size,
                                             new_bias_shape=block.relative_position_bias_table.shape)
        assert torch.equal(model.state_dict()[k], expected), k
    assert report.reshaped["layers.0.blocks.0.attn.relative_position_bias_table"].endswith("(9, 1) -> (49, 1)")
    assert len(report.loaded) == len(src) - 3 and not report.random_init
    assert_same_tensors(model, src, skip=tables)


@pytest.mark.parametrize("chunks", [0, 2])
def test_dinov2_hub_vit_loads_with_position_embedding_interpolated(tmp_path, chunks):
    source = tiny_model(DINOV2, **DINOV2_ARCH, img_size=70)  # 5 x 5 patches of 14 px (518 px: 37 x 37)
    path = save(dinov2_hub(source, chunks), tmp_path / "dinov2_vits14_pretrain.pth")
    model = build_backbone(DINOV2, {**DINOV2_ARCH, "img_size": 42})  # 3 x 3 patches
    report = load_backbone_weights(model, path)
    src = state(source)
    expected = resample_abs_pos_embed(src["pos_embed"], new_size=[3, 3], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert_same_tensors(model, src, skip={"pos_embed"})
    assert model.blocks[3].ls1.gamma.shape == (32,)  # layer scale: DINOv2's name is timm's
    assert report.layout == "dinov2"
    assert report.reshaped == {"pos_embed": "pos_embed (1, 26, 32) -> (1, 10, 32)"}
    assert report.counts() == {"loaded": len(src) - 1, "reshaped": 1, "random_init": 0, "ignored": 1}
    assert report.ignored == {"mask_token": "masked-image token (pre-training only)"}
    if chunks:  # FSDP chunk layout: blocks.1.3.x is block 3
        assert report.loaded["blocks.3.mlp.fc2.weight"] == "blocks.1.3.mlp.fc2.weight"


def test_dinov2_registers_fold_the_class_row_of_the_position_embedding(tmp_path):
    arch = dict(DINOV2_ARCH, depth=2, img_size=42)
    source = tiny_model("vit_small_patch14_reg4_dinov2", **arch)
    release = dinov2_hub_registers(source)
    path = save(release, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = build_backbone("vit_small_patch14_reg4_dinov2", arch)
    report = load_backbone_weights(model, path)
    src = state(source)
    # timm's model has no class-token row: cls_token + pos_embed[:, 0] (timm's _convert_dinov2)
    assert torch.allclose(model.cls_token.detach(), release["cls_token"] + release["pos_embed"][:, :1], atol=0)
    assert torch.allclose(model.cls_token.detach(), src["cls_token"], atol=1e-6)
    assert torch.equal(model.pos_embed.detach(), src["pos_embed"])
    assert torch.equal(model.reg_token.detach(), release["register_tokens"])
    assert report.loaded["reg_token"] == "register_tokens"
    assert set(report.reshaped) == {"cls_token", "pos_embed"}
    assert report.counts() == {"loaded": len(src) - 2, "reshaped": 2, "random_init": 0, "ignored": 1}


def test_dinov3_release_loads_into_timms_dinov3_vit(tmp_path):
    arch = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
    name = "vit_small_patch16_dinov3_qkvb"
    source = tiny_model(name, **arch)
    path = save(dinov3_release(source), tmp_path / "dinov3_vits16_pretrain.pth")
    model = build_backbone(name, arch)
    report = load_backbone_weights(model, path)
    assert_same_tensors(model, state(source))
    assert report.layout == "dinov3"
    assert report.loaded["blocks.1.gamma_2"] == "blocks.1.ls2.gamma"
    assert report.loaded["reg_token"] == "storage_tokens"
    # the one qkv bias is split into q and v (k is fixed at 0): made from the file's tensor
    assert report.reshaped["blocks.0.attn.q_bias"] == "blocks.0.attn.qkv.bias (96,) -> (32,)"
    n = len(model.state_dict())
    assert report.counts() == {"loaded": n - 4, "reshaped": 4, "random_init": 0, "ignored": 4}
    assert set(report.ignored) == {"mask_token", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask",
                                   "blocks.1.attn.qkv.bias_mask"}


def test_mae_checkpoint_starts_dex_director_and_experts_from_each_block_mlp(tmp_path):
    """ImageNet MAE ViT-B / RETFound layout ({"model": ..., decoder_*, mask_token}) at 32 px into
    DEX at 48 px: the position embedding is interpolated, the decoder ignored, and every block's
    director and experts equal the file's MLP."""
    source = tiny_model("vit_tiny_patch16_224", **VIT_ARCH, img_size=32)
    path = save(mae_pretrain(source), tmp_path / "mae_pretrain_vit_base.pth")
    dex = tiny_dex(img_size=48, init_checkpoint=str(path))
    report = dex.init_report
    assert report is not None and report.layout == "mae"
    src = state(source)
    assert report.counts() == {"loaded": len(src) - 1, "reshaped": 1, "random_init": 0, "ignored": 7}
    assert report.reshaped == {"pos_embed": "pos_embed (1, 17, 32) -> (1, 37, 32)"}
    assert all(v == "MAE decoder (pre-training only)" for v in report.ignored.values())
    expected = resample_abs_pos_embed(src["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(dex.vit.pos_embed.detach(), expected)
    for i, block in enumerate(dex.vit.blocks):
        copies = [block.mlp.director, *block.mlp.experts]
        assert len(copies) == 1 + 4
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            for copy in copies:
                assert torch.equal(copy.state_dict()[part], src[f"blocks.{i}.mlp.{part}"]), (i, part)
        assert torch.equal(block.attn.qkv.weight.detach(), src[f"blocks.{i}.attn.qkv.weight"])


def test_retfound_finetuned_norm_is_moved_back_and_head_ignored(tmp_path):
    source = tiny_model("vit_tiny_patch16_224", **VIT_ARCH, img_size=32)
    path = save(mae_finetuned(source), tmp_path / "RETFound_finetuned.pth")
    model = build_backbone("vit_tiny_patch16_224", {**VIT_ARCH, "img_size": 32})
    report = load_backbone_weights(model, path, layout="mae")
    assert_same_tensors(model, state(source))
    assert report.loaded["norm.weight"] == "fc_norm.weight"
    assert report.ignored == {"head.bias": "classifier head", "head.weight": "classifier head"}
    pooled = build_backbone("vit_tiny_patch16_224", {**VIT_ARCH, "img_size": 32, "global_pool": "avg"})
    # MAE's own pre-training file (norm) into a global-pool ViT (fc_norm, as MAE fine-tunes)
    report = load_backbone_weights(pooled, save(mae_pretrain(source), tmp_path / "mae.pth"))
    assert report.loaded["fc_norm.weight"] == "norm.weight"
    assert torch.equal(pooled.fc_norm.weight.detach(), source.norm.weight.detach())


def test_too_little_loaded_is_refused_in_one_line_and_allowed_below_the_threshold(tmp_path):
    source = tiny_model("vit_tiny_patch16_224", **VIT_ARCH, img_size=32)
    partial = {k: v for k, v in state(source).items() if not k.startswith("blocks.2.")}
    partial["decoder_pred.weight"] = torch.zeros(3)
    path = save({"model": partial}, tmp_path / "partial.pth")
    total = len(source.state_dict())  # 42: 12 per block (3 blocks) + 6
    with pytest.raises(InitWeightsError) as err:
        tiny_dex(init_checkpoint=str(path))  # DEX's default min_loaded 0.95
    message = str(err.value)
    assert "\n" not in message
    assert (f"30 of {total} load (71.4% < min_loaded 0.95; loaded 30, reshaped 0, random init 12, "
            "ignored 1); missing e.g. ['blocks.2.norm1.weight', 'blocks.2.norm1.bias']; ignored e.g. "
            "['decoder_pred.weight']") in message
    model = build_backbone("vit_tiny_patch16_224", {**VIT_ARCH, "img_size": 32})
    with pytest.raises(InitWeightsError, match="12 backbone tensors are missing from the checkpoint"):
        load_backbone_weights(model, path)  # the strict default: every tensor
    report = load_backbone_weights(model, path, min_loaded=0.6)
    assert report.random_init == [k for k in source.state_dict() if k.startswith("blocks.2.")]
    assert torch.equal(model.blocks[1].attn.proj.weight.detach(), source.blocks[1].attn.proj.weight.detach())
    wrong = save({"encoder.layer.0.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(InitWeightsError, match=r"no tensor matches .* 0 of 42 load"):
        load_backbone_weights(model, wrong, min_loaded=0.0)
    with pytest.raises(InitWeightsError, match="init_layout swin_ms .* needs a timm Swin, got VisionTransformer"):
        load_backbone_weights(model, path, layout="swin_ms")


def test_whole_training_checkpoint_takes_the_teacher_backbone(tmp_path):
    """A DINO-style training checkpoint ({"teacher": {"backbone.*", "head.*"}}): the backbone
    keys load, the head is reported as outside the backbone."""
    source = tiny_model(SWIN, **SWIN_ARCH)
    teacher = {f"backbone.{k}": v for k, v in state(source).items()}
    teacher["head.last_layer.weight"] = torch.zeros(4, 4)
    path = save({"teacher": teacher, "student": {"x": torch.zeros(1)}}, tmp_path / "checkpoint.pth")
    model = build_backbone(SWIN, SWIN_ARCH)
    report = load_backbone_weights(model, path)
    assert_same_tensors(model, state(source))
    assert report.ignored == {"head.last_layer.weight": "outside backbone"}


def test_midol_run_prints_and_saves_the_report_and_teacher_equals_student(tmp_path, caplog):
    """M-IDoL from a Microsoft Swin release: the table is printed at construction, the student
    and teacher backbones hold the file's tensors, and fit writes init_report.json."""
    import lightning as L

    from tests.helpers.tiny import TINY_SWIN

    source = tiny_model(SWIN, **TINY_SWIN)
    path = save(swin_ms_release(source), tmp_path / "swin_release.pth")
    with caplog.at_level(logging.INFO):
        module = tiny_module(init_checkpoint=str(path))
    assert "(layout swin_ms): 67 of 67 backbone tensors from the file (100.0%)" in caplog.text
    assert isinstance(module.init_report, LoadReport)
    assert_same_tensors(module.student["backbone"], state(source))
    assert_same_tensors(module.teacher["backbone"], state(source))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "run")
    trainer.fit(module, tiny_datamodule())
    saved = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert saved["counts"] == {"loaded": 67, "reshaped": 0, "random_init": 0, "ignored": 7}
    assert saved["layout"] == "swin_ms" and saved["source"] == str(path)
    assert saved["loaded"]["layers.3.downsample.reduction.weight"] == "layers.2.downsample.reduction.weight"


def test_a_missing_file_says_to_fetch_it_by_hand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"init_checkpoint weights/x.pth not found \(relative paths are "
                       r"from .*\): midol never downloads; fetch the released file by hand"):
        tiny_dex(init_checkpoint="weights/x.pth")


@pytest.mark.slow  # two full-size Swin-B: ~15 s on the shared 2-core CPU
def test_full_size_swin_b_release_layout_counts_as_the_readme_shows():
    """The README's example report: a full-size Swin-B written in Microsoft's release layout
    (random values; every key, buffer and the 21841-class head of the release)."""
    from midol.models.weight_maps import convert_state_dict

    source = build_backbone("swin_base_patch4_window7_224")
    release = swin_ms_release(source, classes=21841)["model"]
    del release["layers.0.blocks.1.attn_mask"]
    shifted = [n for n, m in source.named_modules() if hasattr(m, "shift_size") and max(m.shift_size) > 0]
    release.update({f"{n}.attn_mask": torch.zeros(1) for n in shifted})
    _, report = convert_state_dict({"model": release}, build_backbone("swin_base_patch4_window7_224"))
    assert len(shifted) == 11  # odd blocks of stages 1-3; stage 4 (7 x 7 patches) has no shift
    assert report.counts() == {"loaded": 327, "reshaped": 0, "random_init": 0, "ignored": 2 + 24 + 11}
    assert sum(k != v for k, v in report.loaded.items()) == 9


def test_bad_layout_or_threshold_is_refused_without_a_file():
    with pytest.raises(InitWeightsError, match="init_layout must be one of auto, timm, swin_ms, dinov2, dinov3, "
                       "mae, got 'swin'"):
        tiny_dex(init_layout="swin")
    with pytest.raises(InitWeightsError, match=r"min_loaded must lie in \[0, 1\], got 95"):
        tiny_module(min_loaded=95)
