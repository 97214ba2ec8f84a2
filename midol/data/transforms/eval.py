"""The deterministic evaluation transform: resize the shorter side, centre-crop."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from midol.data.image_io import as_rgb
from midol.data.transforms.common import check_size, to_tensor


class EvalTransform:
    """Resize the shorter side to ``size`` (bicubic, area when shrinking), then centre-crop.

    Args:
        size: Side of the square output in pixels.
    """

    def __init__(self, size: int) -> None:
        self.size = check_size("size", size)
        self.pipeline = A.Compose(
            [
                A.SmallestMaxSize(
                    max_size=size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"
                ),
                A.CenterCrop(height=size, width=size),
            ]
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor(self.pipeline(image=as_rgb(image))["image"])
