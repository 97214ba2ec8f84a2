"""Grad-CAM: midol's own code (``midol.analysis.gradcam.grad_cam`` as of commit a30a328, restated
here so the comparison survives its replacement) against the ``grad-cam`` package's
``GradCAM`` with a reshape transform, on real images.

Backbones: the demo M-IDoL teacher (tiny Swin, 64 px; ``make demo``) when present, timm's
``swin_tiny_patch4_window7_224`` and ``vit_small_patch16_224`` with seeded random weights (no
download). Images: Kermany chest X-rays and PH2 dermoscopy from ../shared/data. Score: the
pooled-feature L2 norm (what ``midol analyze`` uses for a pre-trained backbone). Reported:
per-image Pearson correlation of the maps, max abs difference, time of one batch, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/gradcam_compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import REPO, best_time, load_average, need_shared_data  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(root: Path, size: int) -> torch.Tensor:
    """8 real images (4 chest X-rays, 4 dermoscopy), normalised, B x 3 x size x size."""
    xray = sorted((root / "chest_xray/kermany_pneumonia_testsplit_224").rglob("*.jpeg"))[:4]
    derm = sorted((root / "dermoscopy/ph2_lesion/images").glob("*.jpg"))[:4]
    out = []
    for path in [*xray, *derm]:
        rgb = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255)
    return (torch.stack(out) - MEAN) / STD


def own_grad_cam(backbone: nn.Module, x: torch.Tensor, target: nn.Module) -> np.ndarray:
    """midol's former code: hook the stage, d(score)/d(activation), ReLU(sum_c mean-grad_c A_c),
    bilinear upsampling, divided by the per-image maximum."""
    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, i, o: captured.append(o))
    backbone.eval()
    try:
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            scores = backbone(xx).norm(dim=-1)
            act = captured[-1]
            (grads,) = torch.autograd.grad(scores.sum(), act)
    finally:
        handle.remove()
    act, grads = act.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)  # timm Swin: NHWC
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1).numpy()


class NormScore(nn.Module):
    """The backbone with its pooled-feature norm as a one-column output (the package scores
    ``target(output_row)``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).norm(dim=-1, keepdim=True)


def package_cam(backbone: nn.Module, x: torch.Tensor, target: nn.Module, reshape) -> np.ndarray:
    from pytorch_grad_cam import GradCAM

    with GradCAM(NormScore(backbone), [target], reshape_transform=reshape) as cam:
        return cam(x, targets=[lambda out: out[0]] * len(x))


def swin_reshape(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)  # timm Swin stages are NHWC


def vit_reshape(prefix: int, grid: tuple[int, int]):
    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)
    return reshape


def compare(name: str, backbone: nn.Module, x: torch.Tensor, stage: int) -> dict[str, object]:
    target = backbone.layers[stage]
    t_own, own = best_time(lambda: own_grad_cam(backbone, x, target))
    t_pkg, pkg = best_time(lambda: package_cam(backbone, x, target, swin_reshape))
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(own, pkg)]
    return {"backbone": name, "input": list(x.shape), "stage": stage,
            "pearson_min": min(corr), "pearson_mean": float(np.mean(corr)),
            "max_abs_diff": float(np.abs(own - pkg).max()),
            "own_s": t_own, "package_s": t_pkg}


def main() -> int:
    torch.set_num_threads(1)
    root = need_shared_data()
    rows: list[dict[str, object]] = []
    torch.manual_seed(0)
    demo = REPO / "outputs/demo/teacher_backbone.safetensors"
    if demo.exists():
        from midol.tasks.backbones import load_backbone

        backbone, _ = load_backbone(checkpoint=demo)
        rows.append(compare("demo M-IDoL teacher (tiny Swin, 64 px)", backbone, images(root, 64), -2))
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    x224 = images(root, 224)
    rows.append(compare("swin_tiny_patch4_window7_224, seeded random", swin, x224, -1))
    rows.append(compare("swin_tiny_patch4_window7_224, seeded random", swin, x224, -2))
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    reshape = vit_reshape(vit.num_prefix_tokens, tuple(vit.patch_embed.grid_size))
    t_vit, cams = best_time(lambda: package_cam(vit, x224, vit.blocks[-1].norm1, reshape))
    from midol.analysis.gradcam import grad_cam

    t_own_vit, own_vit = best_time(lambda: grad_cam(vit, x224, lambda f: f.norm(dim=-1)))
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(own_vit, cams)]
    rows.append({"backbone": "vit_small_patch16_224, seeded random (midol's ViT path, added after "
                 "this comparison: block -1's norm1, the package's recipe)", "input": list(x224.shape),
                 "pearson_min": min(corr), "pearson_mean": float(np.mean(corr)),
                 "max_abs_diff": float(np.abs(own_vit - cams).max()),
                 "own_s": t_own_vit, "package_s": t_vit})
    print(json.dumps({"load": load_average(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
