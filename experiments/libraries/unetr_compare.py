"""2-D UNETR decoders on the same ViT-B/16 block maps: midol's ``UNETRDecoder`` against MONAI's
``UNETR(spatial_dims=2)`` with its own ViT replaced by the same timm ViT's hidden states.

MONAI's UNETR builds and runs its own ``monai.networks.nets.ViT``; a pre-trained timm / DEX ViT
can only be fed to it by replacing ``unetr.vit`` (done here with a stand-in that returns the
timm blocks' tokens). Equal widths: MONAI ``feature_size=16`` (stages 16/32/64/128) and midol
``dim=16`` (128/64/32/16). Inputs: 4 real images (PH2, 224 px), seeded random weights (the
decoders are trained from scratch in fine-tuning anyway). Reported: decoder parameters,
forward + backward time of the decoder alone (one thread), output shapes.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/unetr_compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import best_time, load_average, need_shared_data  # noqa: E402
from midol.models.unetr_decoder import UNETRDecoder  # noqa: E402


class CachedViT(nn.Module):
    """Stands in for MONAI's ViT: returns (last tokens, hidden states) computed beforehand."""

    def __init__(self, last: torch.Tensor, hidden: list[torch.Tensor]) -> None:
        super().__init__()
        self.last, self.hidden = last, hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.last, self.hidden


def main() -> int:
    from monai.networks.nets import UNETR

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = need_shared_data()
    paths = sorted((root / "dermoscopy/ph2_lesion/images").glob("*.jpg"))[:4]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((224, 224)),
                                                 dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        tokens = vit.patch_embed(x)
        tokens = vit._pos_embed(tokens)
        hidden = []
        for block in vit.blocks:
            tokens = block(tokens)
            hidden.append(tokens[:, vit.num_prefix_tokens:].clone())
        last = vit.norm(tokens)[:, vit.num_prefix_tokens:]
    maps = [h.transpose(1, 2).reshape(4, 768, 14, 14) for h in (hidden[3], hidden[6], hidden[9], last)]

    unetr = UNETR(in_channels=3, out_channels=2, img_size=224, feature_size=16, hidden_size=768,
                  mlp_dim=3072, num_heads=12, spatial_dims=2)
    vit_params = sum(p.numel() for p in unetr.vit.parameters())
    unetr.vit = CachedViT(last, hidden)
    ours = UNETRDecoder([768] * 4, num_classes=2, patch_size=16, dim=16, dropout=0.0)

    def step(fn) -> tuple[float, tuple[int, ...]]:
        def run() -> tuple[int, ...]:
            out = fn()
            out.float().mean().backward()
            return tuple(out.shape)
        return best_time(run)

    t_monai, shape_monai = step(lambda: unetr(x))
    t_ours, shape_ours = step(lambda: ours(maps, x))
    report = {
        "load": load_average(), "input": list(x.shape),
        "monai_decoder_params": sum(p.numel() for p in unetr.parameters()),
        "monai_own_vit_params_replaced": vit_params,
        "midol_decoder_params": sum(p.numel() for p in ours.parameters()),
        "monai_fwd_bwd_s": t_monai, "midol_fwd_bwd_s": t_ours,
        "monai_output": list(shape_monai), "midol_output": list(shape_ours),
        "monai_blocks_used": "hidden_states[3, 6, 9] + final tokens",
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
