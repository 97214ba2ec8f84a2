"""Downstream metrics against hand computations: AUC (one-vs-rest, per label), Dice, IoU."""

from __future__ import annotations

import pytest
import torch

from midol.tasks.segmentation import soft_dice_loss
from midol.tasks.task_metrics import (
    OneVsRestAUROC,
    PerLabelAUROC,
    classification_metrics,
    macro,
    segmentation_metrics,
)
from tests.helpers.metrics import pair_auc

PROBS = torch.tensor([
    [0.7, 0.2, 0.1],
    [0.3, 0.4, 0.3],
    [0.2, 0.5, 0.3],
    [0.1, 0.3, 0.6],
    [0.5, 0.1, 0.4],
    [0.2, 0.2, 0.6],
])
TARGET = torch.tensor([0, 1, 0, 2, 2, 1])


def test_one_vs_rest_auc_matches_hand_computation():
    # class 0: positives rows 0, 2 (scores 0.7, 0.2) vs negatives 0.3, 0.1, 0.5, 0.2
    # pairs: 0.7 beats all 4; 0.2 beats 0.1, ties 0.2 (1/2), loses to 0.3, 0.5 -> (4 + 1.5) / 8
    assert pair_auc(PROBS[:, 0].tolist(), [t == 0 for t in TARGET]) == pytest.approx(5.5 / 8)
    metric = OneVsRestAUROC(3)
    metric.update(PROBS, TARGET)
    per_class = metric.compute()
    for c in range(3):
        expected = pair_auc(PROBS[:, c].tolist(), [t == c for t in TARGET.tolist()])
        assert per_class[c].item() == pytest.approx(expected)
    expected_macro = sum(pair_auc(PROBS[:, c].tolist(), [t == c for t in TARGET.tolist()]) for c in range(3)) / 3
    assert macro(per_class).item() == pytest.approx(expected_macro)


def test_accuracy_is_top1_over_all_images():
    metrics = classification_metrics(3)
    metrics["acc"].update(PROBS, TARGET)
    # argmax per row: 0, 1, 1, 2, 0, 2 -> correct rows 0, 1, 3 -> 3/6
    assert metrics["acc"].compute().item() == pytest.approx(0.5)


def test_class_absent_from_targets_is_left_out_of_the_macro_auc():
    metric = OneVsRestAUROC(3)
    target = torch.tensor([0, 1, 0, 1, 1, 0])  # class 2 never occurs
    metric.update(PROBS, target)
    per_class = metric.compute()
    assert torch.isnan(per_class[2])
    with pytest.warns(UserWarning, match="1 of 3 classes/labels are undefined"):
        value = macro(per_class)
    expected = [pair_auc(PROBS[:, c].tolist(), [t == c for t in target.tolist()]) for c in (0, 1)]
    assert value.item() == pytest.approx(sum(expected) / 2)


def test_per_label_auc_with_a_tie_and_an_undefined_label():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.4, 0.8, 0.5], [0.4, 0.3, 0.1], [0.1, 0.6, 0.7]])
    target = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])  # label 2 all positive
    metric = PerLabelAUROC(3)
    metric.update(scores, target)
    per_label = metric.compute()
    # label 0: positives 0.9, 0.4 vs negatives 0.4, 0.1 -> (1 + 1) + (0.5 + 1) = 3.5 / 4
    assert per_label[0].item() == pytest.approx(3.5 / 4)
    assert per_label[1].item() == pytest.approx(1.0)
    assert torch.isnan(per_label[2])


def _known_masks() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 1     # 4 predicted pixels in image 0
    target[0, :2, :3] = 1   # 6 target pixels, 4 overlap
    pred[1, 3, :] = 1       # 4 predicted pixels in image 1, no target
    target[1, 0, 0] = 1     # 1 target pixel, missed
    return pred, target


def test_dice_and_iou_on_known_masks_are_dataset_level():
    pred, target = _known_masks()
    metrics = segmentation_metrics(2, ignore_index=255)
    for m in metrics.values():
        m.update(pred, target)
    dice, iou = metrics["dice"].compute(), metrics["iou"].compute()
    # foreground over both images: |P| = 8, |T| = 7, |P & T| = 4, |P | T| = 11
    assert dice[1].item() == pytest.approx(2 * 4 / (8 + 7))
    assert iou[1].item() == pytest.approx(4 / 11)
    # background: 32 pixels, |P| = 24, |T| = 25, |P & T| = 24 - (pixels predicted 0 but target 1 = 3) = 21
    assert dice[0].item() == pytest.approx(2 * 21 / (24 + 25))
    assert iou[0].item() == pytest.approx(21 / 28)


def test_ignored_pixels_count_in_neither_dice_nor_iou():
    pred, target = _known_masks()
    target = target.clone()
    target[1] = 255  # image 1 entirely outside the evaluated region
    metrics = segmentation_metrics(2, ignore_index=255)
    for m in metrics.values():
        m.update(pred, target)
    assert metrics["dice"].compute()[1].item() == pytest.approx(2 * 4 / (4 + 6))
    assert metrics["iou"].compute()[1].item() == pytest.approx(4 / 6)


def test_soft_dice_loss_matches_formula_and_ignores_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 3)
    target = torch.randint(0, 2, (2, 3, 3))
    target[0, 0, 0] = 255
    p = logits.softmax(1)[:, 1]
    valid = target != 255
    t = (target == 1) & valid
    inter = (p * t).sum()
    expected = 1 - (2 * inter + 1) / (p[valid].sum() + t.sum() + 1)
    assert soft_dice_loss(logits, target, 255).item() == pytest.approx(expected.item(), rel=1e-6)
    perfect = torch.where(target == 1, 20.0, -20.0).unsqueeze(1)
    perfect = torch.cat([-perfect, perfect], dim=1)
    assert soft_dice_loss(perfect, target, 255).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_per_image_uses_the_empty_mask_rule_and_differs_from_pooled_dice():
    """Restated per image: 2|P∩T| / (|P|+|T|); empty T scores 1 if P is empty too, else 0."""
    from midol.tasks.task_metrics import DicePerClass, DicePerImage

    g = torch.Generator().manual_seed(0)
    target = torch.zeros(10, 8, 8, dtype=torch.long)
    target[:2, 2:6, 2:6] = 1  # 2 of 10 masks have foreground (SIIM-like)
    preds = (torch.rand(10, 8, 8, generator=g) > 0.85).long()
    preds[2:6] = 0  # 4 empty masks predicted empty
    preds[0, 2:6, 2:6] = 1
    metric = DicePerImage(2, ignore_index=255)
    metric.update(preds[:4], target[:4])
    metric.update(preds[4:], target[4:])
    expected = []
    for p, t in zip(preds, target):
        p1, t1 = p == 1, t == 1
        if t1.sum() == 0:
            expected.append(1.0 if p1.sum() == 0 else 0.0)
        else:
            expected.append(float(2 * (p1 & t1).sum() / (p1.sum() + t1.sum())))
    assert float(metric.compute()[1]) == pytest.approx(sum(expected) / 10, abs=1e-6)
    pooled = DicePerClass(2, ignore_index=255)
    pooled.update(preds, target)
    assert abs(float(pooled.compute()[1]) - float(metric.compute()[1])) > 0.05


def test_sanity_check_batches_raise_no_undefined_class_warning() -> None:
    """Issue 27 item 13: the two sanity-check batches lack most classes, and each fine-tune run
    printed a false "1 of 9 classes/labels are undefined" warning before training."""
    import warnings
    from types import SimpleNamespace

    from midol.tasks import ClassificationModule
    from tests.helpers.finetune import tiny_backbone_args

    module = ClassificationModule(num_classes=3, **tiny_backbone_args())
    metrics = module.stage_metrics.of("val")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    target = torch.tensor([0, 1])  # class 2 absent: its AUC is undefined
    metrics.update(probs, target)
    module._trainer = SimpleNamespace(sanity_checking=True)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._log_stage("val")
    assert all(m.update_count == 0 for m in metrics.values())  # reset for the real validation
    metrics.update(probs, target)
    module._trainer = SimpleNamespace(sanity_checking=False)  # type: ignore[assignment]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="1 of 3 classes/labels are undefined"):
        module._log_stage("val")
