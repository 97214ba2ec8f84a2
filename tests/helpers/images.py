"""Real image batches from the bundled sample corpus."""

from __future__ import annotations

import torch

from midol.data import EvalTransform, load_image
from tests.helpers.finetune import SAMPLE_DATA


def real_batch(size: int = 32) -> torch.Tensor:
    """12 uint8 images (X-ray and pathology), evaluation-transformed to ``size`` px."""
    transform = EvalTransform(size)
    files = sorted((SAMPLE_DATA / "xray").rglob("*.png"))[::15] + sorted((SAMPLE_DATA / "pathology").rglob("*.jpg"))[::10]
    return torch.stack([transform(load_image(f)) for f in files])
