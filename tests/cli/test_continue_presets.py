"""The continued pre-training presets (configs/continue/, issue 29 item 1) parse and build their
method from a stand-in of the released file they name (written at that path in that file's own
layout, tests/helpers/continue_presets.py), at tiny scale: every backbone tensor comes from the
file, the report names the preset's layout, and the tensors equal the stand-in's."""

from __future__ import annotations

import pytest
import torch

from midol.cli import run_lightning
from midol.config_compose import load_composed
from tests.helpers.continue_presets import CONTINUE, TINY, preset_init_args, tiny_setup

LAYOUT = {"continue_swin_base": "swin_ms", "continue_dino_vit": "dinov2", "continue_dinov3_vit": "dinov3",
          "continue_mae_vit_base": "mae",
          "continue_dex_vit_base": "mae", "continue_retfound_vit_large": "mae"}


def test_every_continue_preset_is_covered() -> None:
    assert {p.stem for p in CONTINUE.glob("*.yaml")} == set(TINY) == set(LAYOUT)


@pytest.mark.parametrize("preset", sorted(TINY))
def test_preset_builds_from_its_released_file(preset, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the presets name weights/<file> relative to the working folder
    override = tiny_setup(preset, tmp_path)
    args = preset_init_args(preset)
    assert args["init_checkpoint"].startswith("weights/") and args["min_loaded"] == 0.95
    composed = load_composed(CONTINUE / f"{preset}.yaml")
    assert composed["trainer"]["default_root_dir"] == f"outputs/{preset}"
    cli = run_lightning(["--config", str(CONTINUE / f"{preset}.yaml"), "--config", str(override)], run=False)
    report = cli.model.init_report
    assert report.layout == LAYOUT[preset]
    assert report.random_init == [] and set(report.reshaped) == TINY[preset][3]
    assert len(report.loaded) + len(report.reshaped) == report.backbone_tensors
    source = torch.load(tmp_path / args["init_checkpoint"], weights_only=True)
    source = source.get("model", source)
    backbone = cli.model.student["backbone"] if hasattr(cli.model, "student") else cli.model.vit
    own = backbone.state_dict()
    for target, name in report.loaded.items():
        if target in own:  # DEX: a block's MLP lives on in its director and experts
            assert torch.equal(own[target], source[name]), target
    if preset == "continue_dex_vit_base":
        block = cli.model.vit.blocks[2]
        assert len(block.mlp.experts) == 8
        for copy in (block.mlp.director, *block.mlp.experts):
            assert torch.equal(copy.fc2.weight, source["blocks.2.mlp.fc2.weight"])
