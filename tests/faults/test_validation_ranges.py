"""Values that would pass into training and silently break it are refused at construction, with
a ValueError that names the option and its allowed range; an export of an untrained model warns;
exported files are readable by group and others."""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from midol.callbacks import ExportBackbone
from midol.data import MultiCropTransform, SingleViewTransform
from midol.data.transforms import ClassificationTrainTransform, SegmentationTrainTransform
from midol.methods.export import export_method
from tests.helpers.dex import tiny_dex
from tests.helpers.tiny import tiny_datamodule, tiny_module

INF, NAN = math.inf, math.nan
TEMP = "finite and >= 0.001 (lower values make the losses explode)"


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ---------------------------------------------------------------------------- M-IDoL
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_dim": 0}, "out_dim must be >= 1, got 0"),  # L_cst exactly 0 every step
        ({"expert_hidden_dim": 0}, "expert_hidden_dim must be >= 1, got 0"),
        ({"bottleneck_dim": 0}, "bottleneck_dim must be >= 1, got 0"),
        ({"expert_layers": 0}, "expert_layers must be >= 1, got 0"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters must be >= 1, got 0"),
        ({"student_temp": 1e-30}, f"student_temp must be {TEMP}, got 1e-30"),
        ({"teacher_temp": 1e-30}, f"teacher_temp must be {TEMP}, got 1e-30"),
        ({"warmup_teacher_temp": 1e-4}, f"warmup_teacher_temp must be {TEMP}, got 0.0001"),
        ({"infonce_temp": 1e-30}, f"infonce_temp must be {TEMP}, got 1e-30"),
        ({"infonce_temp": INF}, f"infonce_temp must be {TEMP}, got inf"),
        ({"sinkhorn_eps": 1e-30}, f"sinkhorn_eps must be {TEMP}, got 1e-30"),
        ({"route_weight": INF}, "route_weight must be finite and >= 0, got inf"),
        ({"route_weight": -1.0}, "route_weight must be finite and >= 0, got -1.0"),
        ({"cst_weight": -0.5}, "cst_weight must be finite and >= 0, got -0.5"),
        ({"cst_weight": NAN}, "cst_weight must be finite and >= 0, got nan"),
        ({"load_balance_weight": INF}, "load_balance_weight must be finite and >= 0, got inf"),
        ({"router_noise": INF}, "router_noise must be finite and >= 0, got inf"),
        ({"gate_noise": -1.0}, "gate_noise must be finite and >= 0, got -1.0"),
        ({"warmup_teacher_temp_epochs": -1},
         "warmup_teacher_temp_epochs must be finite and >= 0, got -1"),
        ({"freeze_last_layer_epochs": INF}, "freeze_last_layer_epochs must be finite and >= 0, got inf"),
        ({"center_momentum": 1.5}, "center_momentum must be in [0, 1], got 1.5"),
        ({"center_momentum": -0.1}, "center_momentum must be in [0, 1], got -0.1"),
        ({"num_global_views": 0}, "num_global_views must be >= 1, got 0"),
        ({"top_k": 4}, "top_k must lie in [1, num_experts=3], got 4"),
        ({"top_k": 0}, "top_k must lie in [1, num_experts=3], got 0"),
        ({"num_experts": 0}, "num_experts must be >= 1, got 0"),
        ({"route_weight": 0.0, "cst_weight": 0.0},
         ("route_weight, cst_weight and load_balance_weight are all 0: the loss is a constant "
          "and nothing trains; give at least one of them a weight > 0")),
        # MomentumMethod and BaseMethod
        ({"momentum_start": 1.5}, "momentum_start must lie in [0, 1], got 1.5"),
        ({"momentum_end": 1.75}, "momentum_end must lie in [0, 1], got 1.75"),
        ({"momentum_start": -0.1}, "momentum_start must lie in [0, 1], got -0.1"),
        ({"warmup_epochs": -1}, "warmup_epochs must be >= 0, got -1"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_midol_rejects_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=_exact(message)):
        tiny_module(**kwargs)


def test_midol_accepts_the_boundaries() -> None:
    module = tiny_module(student_temp=1e-3, teacher_temp=1e-3, warmup_teacher_temp=1e-3,
                         infonce_temp=1e-3, sinkhorn_eps=1e-3, center_momentum=1.0,
                         momentum_start=0.0, momentum_end=1.0, route_weight=0.0,
                         cst_weight=1.0, out_dim=1, expert_layers=1, sinkhorn_iters=1,
                         num_global_views=1, top_k=3)
    assert module.hparams.student_temp == 1e-3 and module.hparams.out_dim == 1


# ---------------------------------------------------------------------------- DEX
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 0, "top_k": 1}, "num_experts must be >= 1, got 0"),
        ({"routing_temperature": 1e-30}, f"routing_temperature must be {TEMP}, got 1e-30"),
        ({"co_director_temp": 1e-30}, f"co_director_temp must be {TEMP}, got 1e-30"),
        ({"co_expert_temp": INF}, f"co_expert_temp must be {TEMP}, got inf"),
        ({"co_weight": INF}, "co_weight must be finite and >= 0, got inf"),
        ({"co_weight": -0.01}, "co_weight must be finite and >= 0, got -0.01"),
        ({"bal_weight": -0.01}, "bal_weight must be finite and >= 0, got -0.01"),
        ({"noise_start": INF}, "noise_start must be finite and >= 0, got inf"),
        ({"noise_end": -1.0}, "noise_end must be finite and >= 0, got -1.0"),
        ({"freq_momentum": 1.5}, "freq_momentum must be in [0, 1], got 1.5"),
        ({"director_momentum_start": 1.5}, "director_momentum_start must be in [0, 1], got 1.5"),
        ({"director_momentum_end": -0.5}, "director_momentum_end must be in [0, 1], got -0.5"),
        ({"mask_ratio": 1.0}, "mask_ratio must be in [0, 1), got 1.0"),
        ({"img_size": 0}, "img_size must be >= 1, got 0"),
        ({"decoder_dim": 0}, "decoder_dim must be >= 1, got 0"),
        ({"decoder_heads": 0}, "decoder_heads must be >= 1, got 0"),
        ({"decoder_depth": -1}, "decoder_depth must be >= 0, got -1"),
        ({"decoder_dim": 36, "decoder_heads": 8}, "decoder_dim must be divisible by decoder_heads=8, got 36"),
        ({"warmup_epochs": -2}, "warmup_epochs must be >= 0, got -2"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_dex_rejects_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=_exact(message)):
        tiny_dex(**kwargs)


# ---------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MultiCropTransform(global_size=32, local_size=64),
         "local_size must be <= global_size=32 (local views are the smaller crops), got 64"),
        (lambda: SingleViewTransform(32, rotate=360.0), "rotate must lie in [0, 180] degrees, got 360.0"),
        (lambda: SingleViewTransform(32, rotate=INF), "rotate must lie in [0, 180] degrees, got inf"),
        (lambda: SingleViewTransform(32, hflip=1.5), "hflip must lie in [0, 1], got 1.5"),
        (lambda: ClassificationTrainTransform(32, hflip=1.5), "hflip must lie in [0, 1], got 1.5"),
        (lambda: ClassificationTrainTransform(32, vflip=-0.1), "vflip must lie in [0, 1], got -0.1"),
        (lambda: ClassificationTrainTransform(32, color_jitter=-1.0),
         "color_jitter must be finite and >= 0, got -1.0"),
        (lambda: SegmentationTrainTransform(32, vflip=2.0), "vflip must lie in [0, 1], got 2.0"),
    ],
    ids=["local_larger_than_global", "rotate_360", "rotate_inf", "single_hflip", "cls_hflip",
         "cls_vflip", "cls_jitter", "seg_vflip"],
)
def test_transforms_reject_out_of_range_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=_exact(message)):
        make()


def test_local_size_is_free_without_local_views() -> None:
    t = MultiCropTransform(global_size=32, local_size=224, num_global=2, num_local=0)
    assert t.num_views == 2
    assert MultiCropTransform(global_size=32, local_size=32).local_size == 32  # equal is fine


# ---------------------------------------------------------------------------- exports
@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_export_of_an_untrained_method_warns_and_files_are_0644(tmp_path: Path, umask_022) -> None:
    module = tiny_module()
    with pytest.warns(UserWarning, match=_exact(
        "exporting an untrained model: MIDoL has trained on 0 images, so teacher_backbone "
        "hold(s) its initial weights (random, or init_checkpoint's), not pre-trained ones. Check "
        "trainer.max_steps / max_epochs (0 trains nothing), the data, and whether every step was "
        "skipped (nonfinite: skip).")):
        (path,) = export_method(module, tmp_path)
    assert _mode(path) == 0o644 and _mode(path.with_suffix(".json")) == 0o644
    module.images_seen.fill_(16)  # trained (the count a checkpoint keeps): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_method(module, tmp_path / "trained", ["teacher_backbone", "student_backbone"])
    for name in ("teacher_backbone", "student_backbone"):
        for suffix in (".safetensors", ".json"):
            assert _mode(tmp_path / "trained" / f"{name}{suffix}") == 0o644


def test_export_follows_a_stricter_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        module = tiny_module()
        module.images_seen.fill_(8)
        (path,) = export_method(module, tmp_path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o640


def test_export_callback_after_max_steps_0_warns_and_writes_readable_files(
    tmp_path: Path, umask_022
) -> None:
    L.seed_everything(0)
    module = tiny_module()
    before = {k: v.clone() for k, v in module.teacher["backbone"].state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ExportBackbone(dirpath=str(tmp_path / "export"))])
    with pytest.warns(UserWarning, match=re.escape(
            "exporting an untrained model: MIDoL has trained on 0 images (global step 0), so "
            "teacher_backbone hold(s) its initial weights")):
        trainer.fit(module, tiny_datamodule())
    path = tmp_path / "export" / "teacher_backbone.safetensors"
    assert _mode(path) == 0o644 and _mode(path.with_suffix(".json")) == 0o644
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert all(torch.equal(saved[k], v) for k, v in before.items())  # the initial weights
