"""Segmentation heads on Swin stage maps: midol's ``MultiScaleDecoder`` (light FPN fusion)
against segmentation_models_pytorch's ``UPerNetDecoder`` (the head the M-IDoL paper used, via
mmsegmentation) and ``FPNDecoder``, trained on the same frozen features.

Backbone: the demo M-IDoL teacher (tiny Swin, 64 px, ``make demo``), frozen; its four stage maps
(``midol.models.seg_decoder.stage_maps``) of the PH2 lesion images are computed once. Each head
(width 64, a 1x1 classifier, bilinear upsampling to 64 px) is trained from the same seed with
AdamW (lr 1e-3, wd 0.05), CE + soft Dice (midol's loss), 150 steps of batch 8 on 48 images,
and scored by per-image Dice on the other 12; 3 seeds. One thread.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/decoder_compare.py
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import REPO, load_average, need_shared_data  # noqa: E402
from midol.models.seg_decoder import MultiScaleDecoder, stage_channels, stage_indices, stage_maps  # noqa: E402
from midol.tasks.segmentation import soft_dice_loss  # noqa: E402

SIZE, STEPS, BATCH, WIDTH = 64, 150, 8, 64
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SmpHead(nn.Module):
    """An smp decoder on the 4 stage maps (smp skips its first two, the 1/1 and 1/2 maps that a
    Swin does not have: placeholders), a 1x1 classifier, bilinear upsampling."""

    def __init__(self, kind: str, channels: list[int], num_classes: int = 2) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        full = [3, 3, *channels]
        if kind == "upernet":
            self.decoder: nn.Module = UPerNetDecoder(full, encoder_depth=5, decoder_channels=WIDTH)
            out = WIDTH
        else:
            self.decoder = FPNDecoder(full, encoder_depth=5, pyramid_channels=WIDTH,
                                      segmentation_channels=WIDTH, dropout=0.1)
            out = self.decoder.out_channels if hasattr(self.decoder, "out_channels") else WIDTH
        self.classifier = nn.Conv2d(out, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder([maps[0], maps[0], *maps])
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class MidolHead(nn.Module):
    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.decoder = MultiScaleDecoder(channels, 2, WIDTH, 0.1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.decoder(maps, size)


def dice_per_image(logits: torch.Tensor, target: torch.Tensor) -> float:
    p, t = logits.argmax(1) == 1, target == 1
    inter = (p & t).flatten(1).sum(1).float()
    size = (p.flatten(1).sum(1) + t.flatten(1).sum(1)).float()
    return float(torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.ones_like(size)).mean())


def main() -> int:
    from midol.tasks.backbones import load_backbone

    torch.set_num_threads(1)
    root = need_shared_data()
    ckpt = REPO / "outputs/demo/teacher_backbone.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"{ckpt} is missing: run `make demo` first")
    backbone, _ = load_backbone(checkpoint=ckpt)
    backbone.eval()
    ids = stage_indices(backbone, 4)
    channels = stage_channels(backbone, ids)
    images, masks = [], []
    with open(root / "dermoscopy/ph2_lesion/labels.csv") as fh:
        for row in csv.DictReader(fh):
            base = root / "dermoscopy/ph2_lesion"
            rgb = np.asarray(Image.open(base / row["image"]).convert("RGB").resize((SIZE, SIZE)), np.float32)
            images.append(torch.from_numpy(rgb / 255).permute(2, 0, 1))
            m = np.asarray(Image.open(base / row["mask"]).resize((SIZE, SIZE), Image.NEAREST)) > 127
            masks.append(torch.from_numpy(m).long())
    x = (torch.stack(images) - MEAN) / STD
    y = torch.stack(masks)
    with torch.no_grad():
        maps = stage_maps(backbone, x, ids)
    train, val = slice(0, 48), slice(48, 60)
    report: dict[str, object] = {"load_before": load_average(), "stage_channels": channels,
                                 "stage_sizes": [list(m.shape[-2:]) for m in maps]}
    makers = {"midol MultiScaleDecoder": lambda: MidolHead(channels),
              "smp UPerNetDecoder": lambda: SmpHead("upernet", channels),
              "smp FPNDecoder": lambda: SmpHead("fpn", channels)}
    for name, make in makers.items():
        dices, seconds = [], []
        for seed in range(3):
            torch.manual_seed(seed)
            head = make()
            opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
            g = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            head.train()
            for _ in range(STEPS):
                pick = torch.randperm(48, generator=g)[:BATCH]
                logits = head([m[train][pick] for m in maps], (SIZE, SIZE))
                target = y[train][pick]
                loss = F.cross_entropy(logits, target) + soft_dice_loss(logits, target, 255)
                opt.zero_grad()
                loss.backward()
                opt.step()
            seconds.append((time.perf_counter() - start) / STEPS)
            head.eval()
            with torch.no_grad():
                dices.append(dice_per_image(head([m[val] for m in maps], (SIZE, SIZE)), y[val]))
        report[name] = {"params": sum(p.numel() for p in make().parameters()),
                        "val_dice_per_seed": dices, "val_dice_mean": float(np.mean(dices)),
                        "ms_per_step": 1e3 * float(np.median(seconds))}
    report["load_after"] = load_average()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
