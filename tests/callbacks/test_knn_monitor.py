"""The online k-NN monitor: the classifier against a plain restatement, and a real tiny
pre-training run that logs knn/<set>_acc at start and at epoch ends."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from midol.callbacks import KNNMonitor
from midol.callbacks.knn_monitor import weighted_knn_predict
from tests.helpers.tiny import SAMPLE_DATA, tiny_datamodule, tiny_module


def test_weighted_knn_matches_restatement():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    test = torch.randn(7, 5, generator=g)
    k, t = 4, 0.1
    expected = []
    for x in test:
        sims = torch.nn.functional.cosine_similarity(train, x[None], dim=1)
        top = sims.argsort(descending=True)[:k]
        votes = [sum(float(torch.exp(sims[j] / t)) for j in top if labels[j] == c) for c in range(3)]
        expected.append(max(range(3), key=lambda c: votes[c]))
    assert weighted_knn_predict(train, labels, test, 3, k, t).tolist() == expected


def test_knn_of_identical_points_is_exact():
    train = torch.eye(4).repeat(3, 1)  # three copies of four one-hot points
    labels = torch.arange(4).repeat(3)
    assert weighted_knn_predict(train, labels, torch.eye(4) * 2, 4, k=3).tolist() == [0, 1, 2, 3]


def test_monitor_logs_knn_accuracy_during_pretraining(tmp_path):
    torch.manual_seed(0)
    monitor = KNNMonitor([{"name": "xray", "train": {"path": str(SAMPLE_DATA / "xray")},
                           "test_fraction": 0.3}], image_size=32, k=5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[monitor], default_root_dir=tmp_path)
    module = tiny_module()
    trainer.fit(module, tiny_datamodule(batch_size=8))
    assert [h["epoch"] for h in monitor.history] == [0.0, 0.0, 1.0]  # start, epoch 1, epoch 2
    for h in monitor.history:
        assert 0.0 <= h["knn/xray_acc"] <= 1.0
    assert trainer.callback_metrics["knn/xray_acc"] == pytest.approx(monitor.history[-1]["knn/xray_acc"])
    # the logged number is the k-NN accuracy of the module's own features
    again = monitor.evaluate(module)["knn/xray_acc"]
    assert again == pytest.approx(monitor.history[-1]["knn/xray_acc"])


def test_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least one labelled set"):
        KNNMonitor([])
    with pytest.raises(ValueError, match="temperature > 0"):
        KNNMonitor([{"name": "a", "train": {"path": "x"}}], temperature=0)
