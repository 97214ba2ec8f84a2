"""`midol fit` through LightningCLI: every shipped config instantiates, overrides, one step."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator

from midol.cli import main, run_lightning
from midol.loggers import WandbLogger

REPO = Path(__file__).resolve().parents[2]
# Sweeps are checked in test_sweeps.py; downstream configs name a pre-training run's output, so
# test_finetune_configs.py instantiates each of them with a real tiny checkpoint in its place;
# fusion presets name pre-trained exports too (test_fusion_configs.py); eval suites are not
# `midol fit` configs (tests/evaluation/test_shipped_suites.py); continued pre-training presets
# name released weight files under weights/ (tests/cli/test_continue_presets.py builds each from
# a stand-in of that file).
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("[!_]*.yaml")
    if not {"sweeps", "finetune", "fusion", "eval", "continue"} & set(p.parts)
)
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_and_instantiates(config, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repository root
    cli = run_lightning(["--config", str(config), *ON_CPU], run=False)
    # the classes the config names (through its bases), and the ON_CPU overrides took effect
    assert type(cli.model).__name__ == cli.config.model.class_path.rsplit(".", 1)[-1]
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert type(cli.datamodule).__name__ == cli.config.data.class_path.rsplit(".", 1)[-1]
    assert isinstance(cli.trainer.accelerator, CPUAccelerator) and cli.trainer.num_devices == 1
    if config.name == "dex_vit_base.yaml":
        check_dex_settings(cli)
    if config.name == "midol_swin_base.yaml":
        check_paper_settings(cli)


def check_dex_settings(cli) -> None:
    """The DEX preset: ViT-B/16 at 256 px, every block 8 experts top-2, the code's recipe."""
    model, h = cli.model, cli.model.hparams
    layers = model.dex_layers()
    assert len(layers) == 12 and all(la.num_experts == 8 and la.top_k == 2 for la in layers)
    assert layers[0].temperature == 0.5 and layers[0].experts[0].fc1.out_features == 3072
    assert model.vit.patch_embed.img_size == (256, 256) and len(model.decoder.blocks) == 8
    assert model.decoder.embed.out_features == 512
    assert (h.mask_ratio, h.co_weight, h.bal_weight, h.co_form, h.bal_schedule) == (0.75, 0.01, 0.01, "ce", "constant")
    assert (tuple(h.betas), h.weight_decay, h.lr_batch_size, h.warmup_epochs) == ((0.9, 0.999), 1e-6, 512, 10)
    assert cli.trainer.max_epochs == 200 and cli.trainer.gradient_clip_val == 1.0
    assert cli.datamodule.transform.global_size == 256 and cli.datamodule.num_views == 1


def check_paper_settings(cli) -> None:
    """The paper preset builds Swin-B (86.7 M parameters) with the paper's MoE and views."""
    model = cli.model
    n = sum(p.numel() for p in model.student["backbone"].parameters())
    assert 86e6 <= n <= 88e6, n
    projector = model.student["projector"]
    assert projector.num_experts == 5 and projector.top_k == 1
    assert projector.router.out_features == 5
    assert cli.datamodule.num_global == 2 and cli.datamodule.num_views == 8
    assert cli.datamodule.batch_size == 64 and cli.trainer.max_epochs == 100
    assert model.hparams.cst_loss == "infonce"


def test_paper_config_is_checked():
    assert REPO / "configs/pretrain/midol_swin_base.yaml" in CONFIGS


def test_dotted_overrides_reach_the_module(monkeypatch):
    monkeypatch.chdir(REPO)
    cli = run_lightning(
        ["--config", "configs/pretrain/demo.yaml", "--model.init_args.num_experts", "2",
         "--model.init_args.cst_loss", "dino_ce", "--data.init_args.transform.init_args.local_size", "16"],
        run=False,
    )
    assert cli.model.student["projector"].router.out_features == 2
    assert cli.model.dino_loss is not None
    assert cli.datamodule.transform.local_size == 16


def test_wrong_option_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        run_lightning(["--config", "configs/pretrain/demo.yaml", "--model.init_args.num_expertz", "2"], run=False)
    assert exc.value.code != 0
    assert "num_expertz" in capsys.readouterr().err


def test_print_config_shows_typed_defaults(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/pretrain/demo.yaml", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    init = printed["model"]["init_args"]
    assert init["sinkhorn_iters"] == 3 and init["teacher_temp"] == 0.04
    assert init["route_form"] == "student_weighted" and init["teacher_views"] == "global"


def test_one_training_step_through_the_cli(tmp_path, monkeypatch):
    """fast_dev_run on the demo config, with every output redirected to tmp_path."""
    monkeypatch.chdir(REPO)
    text = (REPO / "configs/pretrain/demo.yaml").read_text().replace("outputs/demo", str(tmp_path))
    config = tmp_path / "demo.yaml"
    config.write_text(text)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--data.init_args.num_workers", "0"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 1 and summary["images_seen"] == 32
    counts = torch.tensor(summary["routing_counts"])
    assert counts.shape == (4, 4)
    # every readable image of the sample corpus is routed exactly once: 60 + 41 + 16 + 200
    assert counts.sum(dim=0).tolist() == [60, 41, 16, 200]
    assert (tmp_path / "teacher_backbone.safetensors").is_file()
    assert (tmp_path / "routing_table.md").read_text().startswith("| expert | xray | pathology | oct | fundus |")


def test_wandb_logger_goes_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    logger = WandbLogger(save_dir=str(tmp_path))
    assert logger._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
