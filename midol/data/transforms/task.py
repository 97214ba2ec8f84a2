"""albumentations pipelines for labelled training and evaluation (classification, segmentation).

Like the pre-training views they return uint8 ``C x H x W`` tensors (normalised on the device);
masks come back as int64 ``H x W`` tensors.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from midol.data.image_io import as_rgb
from midol.data.transforms.common import check_scale, check_size, to_tensor
from midol.data.transforms.eval import EvalTransform

__all__ = [
    "ClassificationTrainTransform",
    "EvalTransform",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
]


def _crop_and_flips(size: int, scale: tuple[float, float], hflip: float, vflip: float) -> list[A.BasicTransform]:
    """Random-resized crop (image bicubic, a mask nearest) and the flips asked for."""
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(check_size("size", size),) * 2, scale=check_scale("crop scale", scale),
            interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST,
            area_for_downscale="image",
        )
    ]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        ops.append(A.VerticalFlip(p=vflip))
    return ops


class _Seeded:
    pipeline: A.Compose

    def set_seed(self, seed: int | None) -> None:
        """Albumentations keeps its own random state: every DataLoader worker reseeds it."""
        self.pipeline.set_random_seed(seed)


class ClassificationTrainTransform(_Seeded):
    """Random-resized crop to ``size`` (bicubic), flips, optional colour jitter (strength
    ``color_jitter`` for brightness/contrast/saturation, p=0.8)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float = 0.0,
        seed: int | None = None,
    ) -> None:
        ops = _crop_and_flips(size, scale, hflip, vflip)
        if not 0 <= color_jitter < float("inf"):
            raise ValueError(f"color_jitter must be finite and >= 0, got {color_jitter}")
        if color_jitter > 0:
            j = (max(0.0, 1 - color_jitter), 1 + color_jitter)
            ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=(0.0, 0.0), p=0.8))
        self.pipeline = A.Compose(ops)
        self.set_seed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor(self.pipeline(image=as_rgb(image))["image"])


class SegmentationTrainTransform(_Seeded):
    """Joint random-resized crop (image bicubic, mask nearest) and flips."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.pipeline = A.Compose(_crop_and_flips(size, scale, hflip, vflip))
        self.set_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _image_and_mask(self.pipeline(image=as_rgb(image), mask=mask))


class SegmentationEvalTransform(_Seeded):
    """Resize image (bicubic) and mask (nearest) to ``size x size``; metrics are computed at
    this resolution."""

    def __init__(self, size: int) -> None:
        check_size("size", size)
        self.pipeline = A.Compose([
            A.Resize(height=size, width=size, interpolation=cv2.INTER_CUBIC,
                     mask_interpolation=cv2.INTER_NEAREST, area_for_downscale="image"),
        ])

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _image_and_mask(self.pipeline(image=as_rgb(image), mask=mask))


def _image_and_mask(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return to_tensor(out["image"]), torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
