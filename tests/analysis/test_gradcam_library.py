"""midol's Grad-CAM against the ``grad-cam`` package (issue 28 item 5), on real images: the same
maps up to the per-image scaling, for a Swin stage and (new) a ViT block."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from midol.analysis.gradcam import grad_cam, stage_module
from tests.helpers.paths import SAMPLE_DATA

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _images(size: int = 64) -> torch.Tensor:
    paths = [sorted(p for p in (SAMPLE_DATA / kind).rglob("*") if p.suffix in (".png", ".jpg"))[0]
             for kind in ("oct", "pathology", "xray")]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)),
                                                 dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])
    return (x - MEAN) / STD


class NormScore(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).norm(dim=-1, keepdim=True)


def _package(backbone: nn.Module, x: torch.Tensor, layer: nn.Module, reshape) -> np.ndarray:
    from pytorch_grad_cam import GradCAM

    with GradCAM(NormScore(backbone), [layer], reshape_transform=reshape) as cam:
        return cam(x, targets=[lambda out: out[0]] * len(x))


def _pearson(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(u.ravel(), v.ravel())[0, 1]) for u, v in zip(a, b)]


def test_swin_maps_equal_the_packages_up_to_scaling():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                             embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4)
    x = _images()
    ours = grad_cam(swin, x, lambda f: f.norm(dim=-1), stage=-3)
    theirs = _package(swin, x, swin.layers[-3], lambda t: t.permute(0, 3, 1, 2))
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert min(_pearson(ours, theirs)) > 0.9999
    assert all(m.std() > 0.05 for m in ours)  # real, non-flat maps


def test_vit_maps_equal_the_packages_up_to_scaling():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64,
                            patch_size=8, embed_dim=64, depth=2, num_heads=2)
    x = _images()
    assert stage_module(vit) is vit.blocks[-1].norm1
    ours = grad_cam(vit, x, lambda f: f.norm(dim=-1))

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, vit.num_prefix_tokens:].reshape(t.shape[0], 8, 8, t.shape[-1]).permute(0, 3, 1, 2)

    theirs = _package(vit, x, vit.blocks[-1].norm1, reshape)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert min(_pearson(ours, theirs)) > 0.9999
    assert ours.max() == pytest.approx(1.0) and all(m.std() > 0.01 for m in ours)
    with pytest.raises(ValueError, match="out of range for 2 stages"):
        grad_cam(vit, x, lambda f: f.norm(dim=-1), stage=5)
