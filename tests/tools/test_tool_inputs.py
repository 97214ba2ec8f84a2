"""Tools take the image size from the checkpoint (warning when a data config differs), load a
user's own subclass when trusted with --class-path, and write figures in the chosen formats."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from midol.cli import main
from tests.helpers.tiny import SAMPLE_DATA, TINY_SWIN, save_trained_checkpoint
from tests.helpers.user_subclass import MyMIDoL


@pytest.fixture(scope="module")
def subclass_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("subclass")
    torch.manual_seed(0)
    module = MyMIDoL(my_option=0.25, backbone="swin_tiny_patch4_window7_224", backbone_kwargs=TINY_SWIN,
                     num_experts=3, expert_hidden_dim=32, bottleneck_dim=16, out_dim=64,
                     warmup_epochs=1, freeze_last_layer_epochs=0)
    return save_trained_checkpoint(module, tmp / "mine.ckpt")


def test_subclass_outside_midol_needs_class_path_then_routes(subclass_checkpoint, tmp_path):
    out = tmp_path / "tags.csv"
    args = ["route", str(subclass_checkpoint), "--folder", str(SAMPLE_DATA / "oct"), "--out", str(out),
            "--no-progress"]
    with pytest.raises(ValueError, match=r"outside midol; pass --class-path tests.helpers.user_subclass.MyMIDoL"):
        main(args)
    assert main([*args, "--class-path", "tests.helpers.user_subclass.MyMIDoL"]) == 0
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 16


def test_image_size_comes_from_the_checkpoint_with_a_warning(subclass_checkpoint, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  init_args:\n    transform: {init_args: {global_size: 224}}\n    sources:\n"
                      f"      - {{path: {SAMPLE_DATA / 'oct'}, modality: oct}}\n")
    out = tmp_path / "tags.csv"
    trust = ["--class-path", "tests.helpers.user_subclass.MyMIDoL"]
    with pytest.warns(UserWarning, match=r"image size is 224 px but the checkpoint was pre-trained at 32 px: using 32"):
        assert main(["route", str(subclass_checkpoint), "--data", str(config), "--out", str(out),
                     "--no-progress", *trust]) == 0
    analysis = tmp_path / "analysis"
    with pytest.warns(UserWarning, match="using 32"):
        assert main(["analyze", str(subclass_checkpoint), "--data", str(config), "--out", str(analysis),
                     "--format", "png", "svg", "--dpi", "120", "--embedding", "pca", "--gradcam-per-modality", "0",
                     "--no-progress",
                     *trust]) == 0
    import json

    summary = json.loads((analysis / "analysis.json").read_text())
    assert summary["image_size"] == 32
    pngs = sorted(p.stem for p in analysis.glob("*.png"))
    assert pngs and pngs == sorted(p.stem for p in analysis.glob("*.svg"))
