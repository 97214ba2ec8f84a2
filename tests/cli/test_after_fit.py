"""A sweep run's two needs: the best checkpoint tested at the end of fit (--test_after_fit),
and the whole resolved config (not only the module's settings) in the W&B run's config."""

from __future__ import annotations

import yaml

from midol.cli import run_lightning
from tests.helpers.finetune import SIZE, SWIN
from tests.helpers.tiny import SAMPLE_DATA, TINY_SWIN


def test_test_after_fit_and_wandb_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "midol.loggers.WandbLogger",
                       "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "t"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/auc",
                                         "mode": "max", "filename": "best"}}],
        },
        "model": {"class_path": "midol.tasks.ClassificationModule",
                  "init_args": {"num_classes": 2, "backbone": SWIN, "backbone_kwargs": dict(TINY_SWIN),
                                "lr": 1e-3}},
        "data": {"class_path": "midol.data.LabelledDataModule",
                 "init_args": {"train": {"path": str(SAMPLE_DATA / "xray")}, "val_fraction": 0.3,
                               "test_fraction": 0.2, "image_size": SIZE, "batch_size": 8,
                               "num_workers": 0}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_lightning(["fit", "--config", str(path), "--test_after_fit", "true"])
    metrics = cli.trainer.callback_metrics
    assert "test/auc" in metrics and "test/acc" in metrics  # the test split was scored
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best.endswith("best.ckpt") and cli.trainer.ckpt_path == best  # the best checkpoint
    logged = cli.trainer.logger.experiment.config["config"]
    assert logged["trainer"]["limit_train_batches"] == 2 and logged["seed_everything"] == 3
    assert logged["data"]["init_args"]["test_fraction"] == 0.2
    cli.trainer.logger.experiment.finish()
