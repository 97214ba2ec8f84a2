"""decoder_type: upernet: segmentation_models_pytorch's UPerNetDecoder on Swin stage maps (issue 28
item 5; the head the M-IDoL paper used), trained a step on real tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from midol.models.seg_decoder import stage_maps
from midol.tasks import SegmentationModule
from tests.helpers.finetune import SIZE, quick_trainer, tiny_backbone_args
from tests.helpers.task_data import pathology_pairs


def test_upernet_head_is_smps_decoder_then_a_classifier_at_input_size():
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

    torch.manual_seed(0)
    module = SegmentationModule(num_classes=3, decoder_type="upernet", decoder_dim=16, **tiny_backbone_args()).eval()
    assert isinstance(module.decoder.decoder, UPerNetDecoder)
    x = torch.randn(2, 3, 64, 48)
    logits = module.forward_normalized(x)
    assert logits.shape == (2, 3, 64, 48)
    with torch.no_grad():
        maps = stage_maps(module.backbone, x, module.stage_ids)
        fused = module.decoder.decoder([maps[0], maps[0], *maps])  # smp reads maps 2.. (1/4 to 1/32)
        assert fused.shape[-2:] == maps[0].shape[-2:]
        expected = F.interpolate(module.decoder.classifier(fused), size=(64, 48), mode="bilinear",
                                 align_corners=False)
    torch.testing.assert_close(logits, expected)


def test_upernet_segmentation_trains_and_validates_on_real_tiles(sample_data, tmp_path):
    from midol.data import SegmentationDataModule, SegmentationSource

    torch.manual_seed(0)
    root = pathology_pairs(sample_data, tmp_path / "seg", n=8)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"), val_fraction=0.25,
                                image_size=SIZE, batch_size=4, num_workers=0)
    module = SegmentationModule(num_classes=2, decoder_type="upernet", decoder_dim=16, lr=1e-3,
                                **tiny_backbone_args())
    before = module.decoder.classifier.weight.clone()
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, module.decoder.classifier.weight)
    results = trainer.validate(module, dm, verbose=False)[0]
    assert 0.0 <= results["val/dice"] <= 1.0 and results["val/hd95"] > 0


def test_upernet_needs_four_stage_maps():
    with pytest.raises(ValueError, match="takes 4 stage maps"):
        SegmentationModule(decoder_type="upernet", num_levels=3, **tiny_backbone_args())
