"""Fine-tuning tells the user the number that matters: the monitored metric on the progress
bar, the best checkpoint's score, epoch and path at the end, and a warning when no checkpoint
was ever validated."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from midol.data import LabelledDataModule, LabelledSource
from midol.tasks import ClassificationModule
from tests.helpers.finetune import SIZE, tiny_backbone_args


def fit(sample_data: Path, tmp_path: Path, **trainer_args) -> tuple[L.Trainer, ModelCheckpoint]:
    torch.manual_seed(0)
    dm = LabelledDataModule(train=LabelledSource(str(sample_data / "xray")), val_fraction=0.3,
                            image_size=SIZE, batch_size=8, num_workers=0, split_seed=1)
    module = ClassificationModule(num_classes=2, lr=1e-3, **tiny_backbone_args())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auc", mode="max", filename="best")
    args = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, logger=False,
                callbacks=[ckpt], enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tmp_path)
    args.update(trainer_args)
    trainer = L.Trainer(**args)
    trainer.fit(module, dm)
    return trainer, ckpt


def test_end_of_fit_names_best_score_epoch_and_path(sample_data, tmp_path, capsys):
    trainer, ckpt = fit(sample_data, tmp_path)
    out = capsys.readouterr().out
    epoch = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["epoch"]
    line = f"best val/auc = {float(ckpt.best_model_score):.4f} at epoch {epoch}: {ckpt.best_model_path}"
    assert line in out
    # the monitored metric is a progress-bar metric
    assert "val/auc" in trainer.progress_bar_metrics


def test_warns_when_no_checkpoint_was_validated(sample_data, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(sample_data, tmp_path, max_epochs=1, check_val_every_n_epoch=5)
    messages = [str(w.message) for w in caught]
    assert any("ended without a validated checkpoint (val/auc was never computed: 1 epoch(s) run, "
               "validation every 5 epoch(s))" in m for m in messages), messages
