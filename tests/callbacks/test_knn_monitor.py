"""The online k-NN monitor: its decision rule (argmax of midol eval's ``knn_scores``) against a
plain restatement of DINO's weighted vote, and a real tiny pre-training run that logs
knn/<set>_acc at start and at epoch ends."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from midol.callbacks import KNNMonitor
from midol.evaluation.protocols import knn_scores
from tests.helpers.tiny import SAMPLE_DATA, tiny_datamodule, tiny_module


def restated_predictions(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
                         num_classes: int, k: int, t: float) -> list[int]:
    """``argmax_c sum_{j in top-k} exp(cos_j / T) [y_j = c]`` (Wu et al. 2018; DINO), one test
    row at a time."""
    out = []
    for x in test:
        sims = torch.nn.functional.cosine_similarity(train, x[None], dim=1)
        top = sims.argsort(descending=True, stable=True)[:k]
        votes = [sum(float(torch.exp(sims[j] / t)) for j in top if labels[j] == c) for c in range(num_classes)]
        out.append(max(range(num_classes), key=lambda c: votes[c]))
    return out


def monitor_predictions(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
                        num_classes: int, k: int, t: float) -> list[int]:
    """What KNNMonitor.evaluate classifies with: the top class of midol eval's kNN scores."""
    kind = "binary" if num_classes == 2 else "multiclass"
    return knn_scores(train.numpy(), labels.numpy(), test.numpy(), kind, num_classes, k=k,
                      temperature=t).argmax(axis=1).tolist()


def test_monitor_knn_matches_restatement():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    test = torch.randn(7, 5, generator=g)
    assert monitor_predictions(train, labels, test, 3, 4, 0.1) == restated_predictions(train, labels, test, 3, 4, 0.1)


def test_knn_of_identical_points_is_exact():
    train = torch.eye(4).repeat(3, 1)  # three copies of four one-hot points
    labels = torch.arange(4).repeat(3)
    assert monitor_predictions(train, labels, torch.eye(4) * 2, 4, 3, 0.07) == [0, 1, 2, 3]


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
    # ... and the DINO vote of those features gives the same accuracy as before the port
    module.eval()
    dm = monitor._data["xray"]
    train_x, train_y = monitor._features(module, dm, "train", 2000)
    test_x, test_y = monitor._features(module, dm, "val", 2000)
    restated = restated_predictions(train_x, train_y, test_x, int(dm.num_classes), 5, 0.07)
    assert again == pytest.approx(float(np.mean(np.array(restated) == test_y.numpy())))


def test_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least one labelled set"):
        KNNMonitor([])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        KNNMonitor([{"name": "a", "train": {"path": "x"}}], temperature=0)


def test_nan_temperature_is_refused():  # nan passed the old `temperature <= 0` check
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got nan"):
        KNNMonitor(sets=[{"name": "x", "train": {"path": "unused"}}], temperature=float("nan"))


def test_max_images_zero_is_refused_by_name():
    with pytest.raises(ValueError, match=r"set 'x': max_images must be >= 1, got 0"):
        KNNMonitor(sets=[{"name": "x", "train": {"path": "unused"}, "max_images": 0}])


def test_input_size_comes_from_each_methods_own_option():
    from types import SimpleNamespace

    from midol.callbacks.knn_monitor import input_size

    assert input_size(SimpleNamespace(hparams={"img_size": 64})) == 64  # DEX
    assert input_size(SimpleNamespace(hparams={"backbone_kwargs": {"img_size": 32}})) == 32  # M-IDoL
    assert input_size(SimpleNamespace(hparams={"image_size": 48, "img_size": 64})) == 48
    assert input_size(SimpleNamespace(hparams={})) == 224


def test_a_dex_module_is_scored_at_its_own_size_without_image_size():
    """A tiny DEX ViT is built for 32 px; the monitor used to feed it 224 px and crash."""
    from tests.helpers.dex import tiny_dex
    from tests.helpers.tiny import SAMPLE_DATA

    monitor = KNNMonitor(sets=[{"name": "oct", "train": {"path": str(SAMPLE_DATA / "oct")},
                                "test_fraction": 0.5}], k=3)
    result = monitor.evaluate(tiny_dex())
    assert set(result) == {"knn/oct_acc"} and 0.0 <= result["knn/oct_acc"] <= 1.0
