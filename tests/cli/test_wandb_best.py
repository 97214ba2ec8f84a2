"""W&B keeps the last value as a run's summary; midol's logger adds the best-so-far value, so
sweeps rank runs on their best epoch."""

from __future__ import annotations

import pytest

from midol.loggers import BestSoFar, WandbLogger


def test_best_so_far_by_direction_and_pattern():
    best = BestSoFar({"val/loss": "min", "val/auc*": "max"})
    assert best.update({"val/auc": 0.5, "val/loss": 1.0, "train/loss": 3.0}) == {
        "best/val/auc": 0.5, "best/val/loss": 1.0}
    assert best.update({"val/auc": 0.4, "val/loss": 0.7, "val/auc_N": 0.6}) == {
        "best/val/loss": 0.7, "best/val/auc_N": 0.6}
    assert best.update({"val/auc": float("nan")}) == {}
    assert best.best == {"val/auc": 0.5, "val/loss": 0.7, "val/auc_N": 0.6}
    with pytest.raises(ValueError, match="'max' or 'min'"):
        BestSoFar({"val/auc": "up"})


def test_offline_run_summary_holds_the_best_value(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="midol-test")
    for step, auc in enumerate([0.5, 0.9, 0.6]):
        logger.log_metrics({"val/auc": auc, "val/loss": 1 - auc}, step=step)
    summary = logger.experiment.summary
    assert summary["val/auc"] == pytest.approx(0.6)  # W&B's own: the last value
    assert summary["best/val/auc"] == pytest.approx(0.9)
    assert summary["best/val/loss"] == pytest.approx(0.1)
    logger.experiment.finish()
