"""Segmentation metrics taken from MONAI (issue 28 item 5), pinned on real masks: HD95 against a
plain restatement with scipy's distance transform, Dice per image against its definition."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from midol.tasks.task_metrics import DicePerImage, HD95PerClass, segmentation_metrics, stage_results

PH2 = ("IMD002", "IMD003", "IMD004", "IMD006")


def _ph2(shared_data, size: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) B x size x size: the lesion masks and a real, simple segmentation
    of the image (grey level below the image's mean: lesions are dark)."""
    preds, targets = [], []
    for name in PH2:
        base = shared_data / "dermoscopy" / "ph2_lesion"
        grey = np.asarray(Image.open(base / "images" / f"{name}.jpg").convert("L")
                          .resize((size, size), Image.BILINEAR), dtype=np.float64)
        mask = np.asarray(Image.open(base / "masks" / f"{name}_lesion.png")
                          .resize((size, size), Image.NEAREST)) > 127
        preds.append(torch.from_numpy(grey < grey.mean()).long())
        targets.append(torch.from_numpy(mask).long())
    return torch.stack(preds), torch.stack(targets)


def _plain_hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """The definition: boundary pixels (in the mask, a 4-neighbour outside it), the distance of
    each to the other mask's nearest boundary pixel, the 95th percentile of each direction,
    the larger of the two."""
    a = pred & ~ndimage.binary_erosion(pred, border_value=0)
    b = target & ~ndimage.binary_erosion(target, border_value=0)
    to_b, to_a = ndimage.distance_transform_edt(~b), ndimage.distance_transform_edt(~a)
    return float(max(np.percentile(to_b[a], 95), np.percentile(to_a[b], 95)))


def test_hd95_equals_the_scipy_restatement_on_real_lesion_masks(shared_data):
    preds, targets = _ph2(shared_data)
    metric = HD95PerClass(2, ignore_index=255)
    metric.update(preds[:2], targets[:2])
    metric.update(preds[2:], targets[2:])
    expected = [_plain_hd95(p.numpy() == 1, t.numpy() == 1) for p, t in zip(preds, targets)]
    assert min(expected) > 1.0  # real boundary errors, not a trivial match
    value = metric.compute()
    assert math.isnan(float(value[0]))
    assert float(value[1]) == pytest.approx(float(np.mean(expected)), abs=1e-3)


def test_hd95_scores_an_empty_prediction_as_the_diagonal_and_skips_both_empty(shared_data):
    preds, targets = _ph2(shared_data, size=64)
    empty = torch.zeros_like(preds[:1])
    metric = HD95PerClass(2)
    metric.update(empty, targets[:1])  # lesion missed: the worst distance, not hidden
    assert float(metric.compute()[1]) == pytest.approx(math.hypot(64, 64))
    metric.update(empty, empty)  # nothing to find, nothing found: not counted
    assert float(metric.compute()[1]) == pytest.approx(math.hypot(64, 64))
    fresh = HD95PerClass(2)
    fresh.update(empty, empty)
    assert math.isnan(float(fresh.compute()[1]))


def test_hd95_leaves_ignored_pixels_out(shared_data):
    preds, targets = _ph2(shared_data)
    band = targets.clone()
    band[:, :, :20] = 255  # an unlabelled band, as DRIVE's outside of the field of view
    metric = HD95PerClass(2, ignore_index=255)
    metric.update(preds, band)
    keep = (band != 255).numpy()
    expected = [_plain_hd95((p.numpy() == 1) & k, (t.numpy() == 1) & k)
                for p, t, k in zip(preds, band, keep)]
    assert float(metric.compute()[1]) == pytest.approx(float(np.mean(expected)), abs=1e-3)


def test_dice_per_image_on_real_masks_equals_its_definition(shared_data):
    preds, targets = _ph2(shared_data)
    targets[:, :8] = 255
    metric = DicePerImage(2, ignore_index=255)
    metric.update(preds, targets)
    valid = targets != 255
    p1, t1 = (preds == 1) & valid, (targets == 1) & valid
    per_image = 2 * (p1 & t1).flatten(1).sum(1) / (p1.flatten(1).sum(1) + t1.flatten(1).sum(1))
    assert float(metric.compute()[1]) == pytest.approx(float(per_image.double().mean()), abs=1e-6)
    assert 0.3 < float(metric.compute()[1]) < 0.95


def test_segmentation_stage_logs_hd95_of_the_foreground(shared_data):
    preds, targets = _ph2(shared_data, size=64)
    metrics = segmentation_metrics(2, 255)
    for metric in metrics.values():
        metric.update(preds, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask and deprecation warnings stay inside
        out = stage_results(metrics, "val", macro_values=lambda name, v: v[1:])
    expected = np.mean([_plain_hd95(p.numpy() == 1, t.numpy() == 1) for p, t in zip(preds, targets)])
    assert out["val/hd95"] == pytest.approx(float(expected), abs=1e-3)
    assert out["val/hd95_1"] == out["val/hd95"]
    assert "val/hd95_0" not in out


def test_bad_shapes_raise_one_line():
    with pytest.raises(ValueError, match="B x H x W"):
        HD95PerClass(2).update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        HD95PerClass(1)


def test_missing_monai_fails_when_the_metric_is_built(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.metrics", None)
    with pytest.raises(ImportError, match=r"pip install 'midol\[seg\]'"):
        segmentation_metrics(2, 255)


def test_a_segmentation_validation_logs_hd95_equal_to_the_restatement(sample_data, tmp_path):
    from midol.data import SegmentationDataModule, SegmentationSource
    from midol.tasks import SegmentationModule
    from tests.helpers.finetune import SIZE, quick_trainer, tiny_backbone_args
    from tests.helpers.task_data import pathology_pairs

    torch.manual_seed(0)
    root = pathology_pairs(sample_data, tmp_path / "seg", n=6)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"), val_fraction=0.5,
                                image_size=SIZE, batch_size=3, num_workers=0)
    module = SegmentationModule(num_classes=2, decoder_dim=8, **tiny_backbone_args())
    results = quick_trainer(tmp_path, limit_val_batches=None).validate(module, dm, verbose=False)[0]
    module.eval()
    expected = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            for p, t in zip(module(batch["image"]).argmax(1), batch["target"]):
                valid = (t != 255).numpy()
                a, b = (p == 1).numpy() & valid, (t == 1).numpy() & valid
                if a.any() and b.any():
                    expected.append(_plain_hd95(a, b))
                elif a.any() or b.any():
                    expected.append(math.hypot(*t.shape))
    assert expected
    assert results["val/hd95"] == pytest.approx(float(np.mean(expected)), abs=1e-3)
