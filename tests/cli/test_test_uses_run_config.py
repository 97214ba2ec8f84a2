"""`midol test --ckpt_path CKPT` without --config uses the config the run that wrote CKPT saved
(issue 27 item 5: it re-read the preset and silently dropped the fit's overrides, e.g. trained
at 32 px and tested at the preset's size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midol.cli import main
from midol.errors import UsageError
from midol.lightning_cli import with_run_config
from tests.helpers.finetune import SIZE, tiny_backbone_args
from tests.helpers.paths import SAMPLE_DATA


def fit_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "run"), "name": "logs"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": None, "filename": "best",
                                                 "monitor": "val/auc", "mode": "max"}}]},
        "model": {"class_path": "midol.tasks.ClassificationModule",
                  "init_args": {"num_classes": 2, "warmup_steps": 1, **tiny_backbone_args()}},
        "data": {"class_path": "midol.data.LabelledDataModule",
                 "init_args": {"train": {"path": str(SAMPLE_DATA / "xray")}, "val_fraction": 0.3,
                               "test_fraction": 0.3, "image_size": 64, "batch_size": 8,
                               "num_workers": 0, "split_seed": 1}},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_test_without_config_uses_the_runs_saved_config(tmp_path: Path, capsys) -> None:
    preset = fit_config(tmp_path)
    assert main(["fit", "--config", str(preset), "--data.init_args.image_size", str(SIZE)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    tokens = with_run_config(["test", "--ckpt_path", str(ckpt)])
    saved = yaml.safe_load(Path(tokens[2]).read_text())
    assert tokens[:2] == ["test", "--config"] and saved["data"]["init_args"]["image_size"] == SIZE
    capsys.readouterr()
    assert main(["test", "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr()
    assert "test/auc" in out.out + out.err
    # told otherwise, the given config is used
    assert with_run_config(["test", "--config", str(preset), "--ckpt_path", str(ckpt)])[2] == str(preset)


def test_a_checkpoint_without_a_run_config_asks_for_one(tmp_path: Path) -> None:
    import torch

    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bare)
    with pytest.raises(UsageError, match="records no run folder with a config.yaml; pass --config"):
        with_run_config(["test", "--ckpt_path", str(bare)])
