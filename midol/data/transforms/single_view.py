"""One augmented view per image, for masked-image pre-training (MAE, DEX): horizontal flip,
affine rotation, random-resized crop (DEX's released pre-training augmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from midol.data.image_io import as_rgb
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.common import check_scale, check_size, to_tensor
from midol.data.transforms.multicrop import _share_random_state


class SingleViewTransform(ViewTransform):
    """``[view]``: flip (p = 0.5), rotation uniform in +-``rotate`` degrees, then a bicubic
    random-resized crop of ``scale`` to ``size``. Normalisation happens on the device.

    Args:
        size: Side of the view (DEX: 256).
        scale: Area range of the random-resized crop (DEX: 0.2-1).
        rotate: Maximum absolute rotation in degrees (DEX: 15; 0 = none).
        hflip: Probability of a horizontal flip.
        seed: Base seed of :meth:`reseed` (the datamodule's ``seed`` replaces it).
    """

    num_global = 1

    def __init__(self, size: int = 256, scale: tuple[float, float] = (0.2, 1.0), rotate: float = 15.0,
                 hflip: float = 0.5, seed: int | None = None) -> None:
        self.global_size = check_size("size", size)
        self.scale = check_scale("scale", scale)
        if not 0 <= rotate <= 180:
            raise ValueError(f"rotate must lie in [0, 180] degrees, got {rotate}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must lie in [0, 1], got {hflip}")
        ops: list[A.BasicTransform] = [A.HorizontalFlip(p=hflip)]
        if rotate > 0:
            ops.append(A.Affine(rotate=(-rotate, rotate), interpolation=cv2.INTER_LINEAR,
                                border_mode=cv2.BORDER_CONSTANT, p=1.0))
        ops.append(A.RandomResizedCrop(size=(size, size), scale=self.scale,
                                       interpolation=cv2.INTER_CUBIC, area_for_downscale="image"))
        self.pipeline = A.Compose(ops)
        self.seed = int(np.random.SeedSequence(seed).entropy)  # type: ignore[arg-type]
        self.set_seed(self.seed)

    @property
    def num_views(self) -> int:
        return 1

    def set_seed(self, seed: int | None) -> None:
        _share_random_state(self.pipeline, np.random.SeedSequence(seed))

    def reseed(self, key: Sequence[int]) -> None:
        _share_random_state(self.pipeline, np.random.SeedSequence(self.seed, spawn_key=tuple(int(k) for k in key)))

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        return [to_tensor(self.pipeline(image=as_rgb(image))["image"])]
