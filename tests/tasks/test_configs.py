"""Every downstream config parses and instantiates (with a tiny checkpoint in place of the
pre-training run it names); real-set configs read their data; paper configs carry Table 4."""

from __future__ import annotations

from pathlib import Path

import pytest

from midol.cli import run_lightning
from midol.tasks import ClassificationModule, MultiLabelModule, SegmentationModule
from tests.helpers.finetune import REPO, pretrain_checkpoint

CONFIGS = sorted((REPO / "configs" / "finetune").rglob("[!_]*.yaml"))  # _*.yaml: bases
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
          "--trainer.precision=32-true"]
TABLE4_LR = {
    "aptos2019": 5e-4, "glaucoma_fundus": 5e-4, "papila": 1e-3, "retina": 8e-4, "octdl": 1e-4,
    "octid": 1e-4, "tvhl_dme": 1e-4, "tvhl_dr": 1e-4, "breakhis_binary": 1e-4, "breakhis_8c": 1e-4,
    "mitosis": 1e-4, "mhist": 1e-4, "isic2016": 5e-6, "isic2017": 5e-6, "ham10000": 5e-6,
    "isic2018_seg": 2e-5, "nih_chestxray14": 3e-3, "chexpert": 3e-3, "zhangcxr": 5e-4, "rsna": 5e-4,
    "siim_pneumothorax_seg": 2e-5,
}
# Real sets in ../shared/data: split sizes the configs must produce.
SPLITS = {
    "pneumoniamnist": {"train": 4708, "val": 524, "test": 624},
    "retinamnist": {"train": 1080, "val": 120, "test": 400},
    "kermany_xray": {"train": 438, "val": 93, "test": 93},  # per class: round(0.15 * 234) + round(0.15 * 390)
    "isic9": {"train": 378, "val": 81, "test": 81},
    "crc_tissue": {"train": 25, "val": 8, "test": 8},
    "drive_vessels_seg": {"train": 16, "val": 4, "test": 20},
    "ph2_lesion_seg": {"train": 36, "val": 12, "test": 12},
}


def build(config: Path, ckpt: Path):
    """LightningCLI(run=False) on ``config`` with ``ckpt`` in place of the pre-training run it
    names. A fresh parser each time: re-parsing into a reused LightningCLI kept the first
    config's values with some jsonargparse releases."""
    args = ["--config", str(config), *ON_CPU, f"--model.init_args.init_checkpoint={ckpt}"]
    return run_lightning(args, run=False)


def test_paper_configs_cover_table_4():
    assert {p.stem for p in (REPO / "configs/finetune/paper").glob("[!_]*.yaml")} == set(TABLE4_LR)
    real = {p.stem.rsplit("_", 1)[0] for p in (REPO / "configs/finetune").glob("*_linear.yaml")}
    assert real == {"pneumoniamnist", "retinamnist", "kermany_xray", "isic9", "crc_tissue"}
    assert {p.stem.replace("_linear", "_finetune") for p in (REPO / "configs/finetune").glob("*_linear.yaml")} <= {
        p.stem for p in (REPO / "configs/finetune").glob("*_finetune.yaml")}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs/finetune")))
def test_config_instantiates(config: Path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repository root
    cli = build(config, pretrain_checkpoint(tmp_path_factory))
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert trainer.checkpoint_callback.monitor == model.monitor  # best checkpoint on the task metric
    assert trainer.checkpoint_callback.mode == "max"
    h = model.hparams
    if config.parent.name == "paper":
        assert h.lr == pytest.approx(TABLE4_LR[config.stem])
        check_paper_protocol(config.stem, model, dm)


def check_paper_protocol(name: str, model, dm) -> None:
    h = model.hparams
    if isinstance(model, SegmentationModule):
        assert (h.optimizer, h.weight_decay, h.layer_decay, h.schedule, h.warmup_steps) == ("adamw", 0.05, 0.65, "poly", 1500)
        assert dm.image_size == 512
    elif isinstance(model, MultiLabelModule):
        assert (h.optimizer, h.momentum, h.schedule, h.warmup_steps) == ("sgd", 0.9, "cosine", 50)
        assert dm.batch_size == 64 and dm.image_size == 224  # x 2 GPUs = 128
        assert model.num_labels == {"nih_chestxray14": 14, "chexpert": 5}[name]
    else:
        assert isinstance(model, ClassificationModule)
        assert (h.optimizer, h.momentum, h.warmup_epochs, h.min_lr) == ("sgd", 0.9, 10, 1e-6)
        assert dm.batch_size == 64 and dm.image_size == 224
        assert h.linear_probe == (name in ("breakhis_binary", "breakhis_8c", "mitosis", "mhist"))
        if not h.linear_probe:
            assert h.mixup_alpha > 0 and h.cutmix_alpha > 0 and h.layer_decay < 1


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_real_set_configs_read_their_data(name: str, shared_data, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(REPO)
    ckpt = pretrain_checkpoint(tmp_path_factory)
    config = REPO / "configs/finetune" / (f"{name}.yaml" if name.endswith("_seg") else f"{name}_linear.yaml")
    cli = build(config, ckpt)
    cli.datamodule.setup("fit")
    assert cli.datamodule.split_sizes() == SPLITS[name]
    assert cli.datamodule.num_classes == cli.model.num_classes
