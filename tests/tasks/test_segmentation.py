"""Segmentation on real images: Swin stage maps -> decoder, a training step, Dice/IoU equal to
a recomputation from the predictions, linear probing, and the DRIVE/PH2 sets when present."""

from __future__ import annotations

import pytest
import torch

from midol.data import SegmentationDataModule, SegmentationSource
from midol.models.seg_decoder import stage_indices, stage_maps
from midol.tasks import SegmentationModule
from tests.helpers.finetune import SIZE, pretrain_checkpoint, quick_trainer, tiny_backbone_args
from tests.helpers.task_data import pathology_pairs


def test_decoder_reads_the_four_swin_stages_and_returns_input_size_logits():
    module = SegmentationModule(num_classes=3, decoder_dim=8, **tiny_backbone_args()).eval()
    assert module.stage_ids == [0, 1, 2, 3]
    x = torch.randn(2, 3, 64, 48)
    maps = stage_maps(module.backbone, x, module.stage_ids)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    assert module.forward_normalized(x).shape == (2, 3, 64, 48)
    vit = SegmentationModule(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, depth=8))
    assert stage_indices(vit.backbone) == [1, 3, 5, 7]


def hand_dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    valid = target != 255
    p, t = (pred == 1) & valid, (target == 1) & valid
    inter = (p & t).sum().item()
    return 2 * inter / (p.sum().item() + t.sum().item()), inter / (p | t).sum().item()


def test_segmentation_step_on_real_tiles_and_metrics_match_predictions(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    root = pathology_pairs(sample_data, tmp_path / "seg", n=10)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"), val_fraction=0.3,
                                image_size=SIZE, batch_size=4, num_workers=0)
    module = SegmentationModule(num_classes=2, init_checkpoint=str(ckpt), decoder_dim=16, layer_decay=0.65,
                                schedule="poly", warmup_steps=1, lr=1e-3)
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    results = trainer.validate(module, dm, verbose=False)[0]
    module.eval()
    preds, targets = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            preds.append(module(batch["image"]).argmax(1))
            targets.append(batch["target"])
    dice, iou = hand_dice_iou(torch.cat(preds), torch.cat(targets))
    assert results["val/dice"] == pytest.approx(dice, abs=1e-6)
    assert results["val/iou"] == pytest.approx(iou, abs=1e-6)
    assert results["val/dice_1"] == results["val/dice"]  # binary: foreground mean = class 1


def test_linear_probe_segmentation_trains_the_decoder_only(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    root = pathology_pairs(sample_data, tmp_path / "seg", n=4)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"),
                                image_size=SIZE, batch_size=4, num_workers=0)
    module = SegmentationModule(init_checkpoint=str(ckpt), linear_probe=True, decoder_dim=16, lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    quick_trainer(tmp_path, max_steps=1).fit(module, dm)
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(before["decoder.classifier.weight"], after["decoder.classifier.weight"])


@pytest.mark.parametrize("dataset", ["drive", "ph2"])
def test_one_step_on_shared_segmentation_sets(dataset, shared_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    if dataset == "drive":
        pairs = str(shared_data / "fundus/drive_vessel_seg/pairs.csv")
        dm = SegmentationDataModule(
            train=SegmentationSource(pairs, region_column="fov_mask", split="training"),
            test=SegmentationSource(pairs, region_column="fov_mask", split="test"),
            val_fraction=0.2, image_size=64, batch_size=2, num_workers=0)
    else:
        dm = SegmentationDataModule(
            train=SegmentationSource(str(shared_data / "dermoscopy/ph2_lesion"), mask_suffix="_lesion"),
            val_fraction=0.2, test_fraction=0.2, image_size=64, batch_size=2, num_workers=0)
    module = SegmentationModule(init_checkpoint=str(ckpt), decoder_dim=16)
    trainer = quick_trainer(tmp_path, max_steps=1, limit_test_batches=2)
    trainer.fit(module, dm)
    test = trainer.test(module, dm, verbose=False)[0]
    assert 0 <= test["test/dice"] <= 1 and 0 <= test["test/iou"] <= test["test/dice"] + 1e-6
