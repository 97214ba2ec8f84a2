"""`midol export`: the teacher backbone of a pre-training checkpoint as safetensors + JSON,
loadable into timm with strict=True and giving the teacher's features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from midol.cli import main
from midol.methods import PretrainModule
from tests.helpers.finetune import pretrain_checkpoint
from tests.helpers.images import real_batch


def test_export_reloads_into_timm_strictly_with_the_teachers_features(tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "teacher_backbone.json").read_text())
    assert meta["timm_model"] == "swin_tiny_patch4_window7_224" and meta["image_size"] == 32
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]

    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["overrides"])
    state = load_file(str(tmp_path / "teacher_backbone.safetensors"))
    model.load_state_dict(state, strict=True)

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in state.items():
        assert torch.equal(value, saved[f"teacher.backbone.{key}"]), key
    # The EMA teacher is not the student: exporting the wrong one would show here.
    assert any(not torch.equal(v, saved[f"student.backbone.{k}"]) for k, v in state.items())

    images = real_batch(meta["image_size"])
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        exported = model.eval()(((images.float() / 255) - mean) / std)
    teacher = PretrainModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    expected = teacher.teacher_features(images)
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)
    assert exported.shape == (len(images), model.num_features) and np.isfinite(exported.numpy()).all()


def test_export_in_timms_local_format_loads_with_the_right_input_size(tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path)]) == 0
    local = tmp_path / "teacher_backbone_timm"
    assert sorted(p.name for p in local.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # + model card
    assert (local / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    model = timm.create_model(f"local-dir:{local}", pretrained=True)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # not timm's 224 default
    assert model.num_classes == 0
    state = load_file(str(tmp_path / "teacher_backbone.safetensors"))
    for key, value in model.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
    assert set(state) <= set(model.state_dict())
    # timm's own data config follows the recorded size
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32)


def test_weights_and_description_of_two_exports_never_mix(tmp_path_factory, tmp_path):
    """Issue 26 item 16: a kill between an export's files left new weights beside an old JSON
    (or the reverse); the JSON now records the weights' sha256 and a reader refuses a mix."""
    import hashlib

    from safetensors.torch import save_file

    from midol.errors import CheckpointFileError
    from midol.methods.export import read_export_meta
    from midol.tasks.backbones import load_backbone

    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path), "--no_model_card"]) == 0
    weights = tmp_path / "teacher_backbone.safetensors"
    meta = read_export_meta(weights)
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    state = load_file(str(weights))
    save_file({k: v + 1 for k, v in state.items()}, str(weights))  # the next export's weights
    with pytest.raises(CheckpointFileError, match="describes other weights .* interrupted between its files"):
        read_export_meta(weights)
    with pytest.raises(CheckpointFileError, match="interrupted between its files"):
        load_backbone(checkpoint=str(weights))
