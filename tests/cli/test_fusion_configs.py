"""The MedMIX presets instantiate through `midol fit`; the ODIR preset with tiny stand-ins for
the demo exports it names (a clean clone has none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm

from midol.cli import run_lightning
from midol.methods.export import BackboneExport, export_backbone
from tests.helpers.paths import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
FUSION = REPO / "configs" / "fusion"
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
pytestmark = pytest.mark.skipif(not (SHARED_DATA / "fundus" / "odir_patients").is_dir(),
                                reason="ODIR patients not found")


def tiny_export(path: Path) -> None:
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    export_backbone(BackboneExport(model, "vit_tiny_patch16_224", kwargs, 32), path.parent, path.stem)


def test_demo_preset_instantiates(monkeypatch):
    monkeypatch.chdir(REPO)
    cli = run_lightning(["--config", str(FUSION / "medmix_demo.yaml"), *ON_CPU], run=False)
    assert [s.name for s in cli.model.expert_specs["fundus"]] == ["random_resnet18", "random_vit_tiny"]
    assert cli.datamodule.input_names == ["left_fundus", "right_fundus", "demographics"]


def test_odir_preset_instantiates_with_its_exports(tmp_path, monkeypatch):
    work = tmp_path / "work"
    for run in ("demo", "demo_dino_baseline"):
        tiny_export(work / "outputs" / run / "teacher_backbone.safetensors")
    os.symlink(SHARED_DATA.parent, tmp_path / "shared")  # the preset reads ../shared/data
    monkeypatch.chdir(work)
    cli = run_lightning(["--config", str(FUSION / "medmix_odir.yaml"), *ON_CPU], run=False)
    h = cli.model.hparams
    assert [s.name for s in cli.model.expert_specs["fundus"]] == ["midol", "dino", "random_resnet18"]
    assert cli.model.teacher_specs["fundus"].image_size == 128
    assert (h.pooling, h.fusion, h.train_drop_rate) == ("attention", "reliability", 0.2)


def test_odir_preset_names_the_command_when_exports_are_missing(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    # (LightningCLI wraps the model's FileNotFoundError in a ValueError with the same text)
    with pytest.raises((FileNotFoundError, ValueError), match="README's MedMIX section"):
        run_lightning(["--config", str(FUSION / "medmix_odir.yaml"), *ON_CPU], run=False)
