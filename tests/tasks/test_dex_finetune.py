"""Fine-tuning from a DEX checkpoint: ``dex_mode`` through the task modules, and the UNETR-style
ViT decoder (DEX's supplement segments with UNETR over blocks 3/6/9/12)."""

from __future__ import annotations

import pytest
import torch

from midol.data import SegmentationDataModule, SegmentationSource
from midol.models.dex import DEXLayer
from midol.models.unetr_decoder import UNETRDecoder
from midol.tasks import ClassificationModule, SegmentationModule
from tests.helpers.dex import dex_datamodule, tiny_dex
from tests.helpers.finetune import quick_trainer
from tests.helpers.task_data import pathology_pairs


@pytest.fixture(scope="module")
def dex_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("dex_pretrain")
    torch.manual_seed(0)
    module = tiny_dex()
    trainer = quick_trainer(root, max_steps=2)
    trainer.fit(module, dex_datamodule())
    path = root / "dex.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_unetr_decoder_shapes_and_stage_wiring():
    dec = UNETRDecoder([32, 32, 32, 32], num_classes=3, patch_size=16, dim=8).eval()
    maps = [torch.randn(2, 32, 4, 3) for _ in range(4)]
    image = torch.randn(2, 3, 64, 48)
    assert dec(maps, image).shape == (2, 3, 64, 48)
    assert len(dec.ups) == 4 and dec.skip_source == [2, 1, 0, None]  # z9, z6, z3, then the image
    # every block map reaches the output
    maps[0].requires_grad_(True)
    dec(maps, image).sum().backward()
    assert maps[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power-of-2"):
        UNETRDecoder([32], 2, patch_size=14)
    with pytest.raises(ValueError, match="block maps"):
        UNETRDecoder([32] * 5, 2, patch_size=16)


@pytest.mark.parametrize("mode", ["director", "experts"])
def test_classification_from_dex_checkpoint_in_both_modes(dex_checkpoint, mode):
    path, pretrained = dex_checkpoint
    module = ClassificationModule(num_classes=2, init_checkpoint=str(path), dex_mode=mode)
    has_dex = any(isinstance(m, DEXLayer) for m in module.backbone.modules())
    assert has_dex is (mode == "experts")
    pretrained.eval()
    pretrained.set_mode(mode)
    x = torch.randn(3, 3, 32, 32)
    module.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.backbone(x), pretrained.vit(x))
    pretrained.set_mode("director")


def test_unetr_segmentation_fits_on_real_tiles_from_dex_experts(dex_checkpoint, sample_data, tmp_path):
    path, _ = dex_checkpoint
    root = pathology_pairs(sample_data, tmp_path / "seg", n=6)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"),
                                val_fraction=0.3, image_size=32, batch_size=4, num_workers=0)
    module = SegmentationModule(num_classes=2, init_checkpoint=str(path), dex_mode="experts",
                                decoder_type="unetr", decoder_dim=8, num_levels=3, lr=1e-3)
    assert isinstance(module.decoder, UNETRDecoder)
    router = next(m for m in module.backbone.modules() if isinstance(m, DEXLayer)).router.weight
    before = router.detach().clone()
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, router.detach())  # routers fine-tune in experts mode
    with pytest.raises(ValueError, match="plain ViT"):
        SegmentationModule(decoder_type="unetr", backbone="swin_tiny_patch4_window7_224",
                           backbone_kwargs={"img_size": 32, "embed_dim": 16, "depths": (1, 1, 1, 1),
                                            "num_heads": (1, 2, 2, 4), "window_size": 2})
