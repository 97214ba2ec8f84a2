"""One augmented view per image, for masked-image pre-training (MAE, DEX): horizontal flip,
affine rotation, random-resized crop (DEX's released pre-training augmentation).

``warp: crop`` draws the same three operations but renders only the crop: one affine warp from
the source to the output (after an area pre-shrink of the crop's source window when it is
downscaled), instead of rotating the whole image and then resizing the crop. The cost no
longer grows with the source size (issue 30 item 4: the DEX view cost more than decoding on
512 px images); the pixels differ from ``warp: image`` by interpolation only (tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch

from midol.data.image_io import as_rgb
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.common import check_scale, check_size, to_tensor
from midol.data.transforms.multicrop import _share_random_state


@dataclass(frozen=True)
class ViewParams:
    """One draw of the view: flip, rotation (degrees, counter-clockwise about the image centre,
    albumentations' sign) and the crop ``(x0, y0, w, h)`` on the rotated canvas."""

    flip: bool
    angle: float
    crop: tuple[int, int, int, int]


def draw_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                rotate: float, hflip: float) -> ViewParams:
    """Flip, angle and a random-resized crop (area in ``scale``, aspect ratio log-uniform in
    3/4-4/3, 10 tries, then the largest centred crop of a clamped ratio: torchvision's rule,
    which albumentations' RandomResizedCrop follows)."""
    flip = bool(rng.random() < hflip)
    angle = float(rng.uniform(-rotate, rotate)) if rotate > 0 else 0.0
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return ViewParams(flip, angle, (int(rng.integers(0, width - w + 1)),
                                            int(rng.integers(0, height - h + 1)), w, h))
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    return ViewParams(flip, angle, ((width - w) // 2, (height - h) // 2, w, h))


def render_view(image: np.ndarray, params: ViewParams, size: int) -> np.ndarray:
    """The view of ``params`` as one warp of the crop's window (see the module docstring)."""
    height, width = image.shape[:2]
    x0, y0, cw, ch = params.crop
    # output pixel centre -> canvas (crop, then resize), -> un-rotated, -> un-flipped source
    to_canvas = np.array([[cw / size, 0, x0 + 0.5 * cw / size - 0.5],
                          [0, ch / size, y0 + 0.5 * ch / size - 0.5], [0, 0, 1]])
    cx, cy = (width - 1) / 2, (height - 1) / 2
    t = math.radians(params.angle)
    c, s = math.cos(t), math.sin(t)
    # cv2's rotation (counter-clockwise for positive angles, y down) maps q -> p = R (q - c) + c;
    # its inverse is the transpose
    unrotate = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]])
    unflip = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]]) if params.flip else np.eye(3)
    m = unflip @ unrotate @ to_canvas
    factor = max(cw, ch) / size
    src = image
    if factor >= 2:  # downscale: shrink only the window the crop reads, by a whole factor k
        k = int(factor)  # (OpenCV's area resize by an integer factor is a fast box filter)
        corners = m @ np.array([[0, size - 1, 0, size - 1], [0, 0, size - 1, size - 1], [1, 1, 1, 1]])
        bx0 = max(int(math.floor(corners[0].min())) - 2, 0)
        by0 = max(int(math.floor(corners[1].min())) - 2, 0)
        bx1 = min(int(math.ceil(corners[0].max())) + 3 + k, width)
        by1 = min(int(math.ceil(corners[1].max())) + 3 + k, height)
        bx1, by1 = bx0 + (bx1 - bx0) // k * k, by0 + (by1 - by0) // k * k
        if bx1 > bx0 and by1 > by0:
            src = cv2.resize(image[by0:by1, bx0:bx1], ((bx1 - bx0) // k, (by1 - by0) // k),
                             interpolation=cv2.INTER_AREA)
            shrink = np.array([[1 / k, 0, 0.5 / k - 0.5 - bx0 / k], [0, 1 / k, 0.5 / k - 0.5 - by0 / k], [0, 0, 1]])
            m = shrink @ m
    # bilinear: one interpolation where the whole-image pipeline has two (rotation, resize)
    out = cv2.warpAffine(src, m[:2], (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


class SingleViewTransform(ViewTransform):
    """``[view]``: flip (p = 0.5), rotation uniform in +-``rotate`` degrees, then a bicubic
    random-resized crop of ``scale`` to ``size``. Normalisation happens on the device.

    Args:
        size: Side of the view (DEX: 256).
        scale: Area range of the random-resized crop (DEX: 0.2-1).
        rotate: Maximum absolute rotation in degrees (DEX: 15; 0 = none).
        hflip: Probability of a horizontal flip.
        seed: Base seed of :meth:`reseed` (the datamodule's ``seed`` replaces it).
        warp: ``image`` (default: albumentations rotates the whole image, then crops and
            resizes: DEX's released pipeline) or ``crop`` (the same draws rendered as one warp
            of the crop's window: faster on large images, equal up to interpolation).
    """

    num_global = 1

    def __init__(self, size: int = 256, scale: tuple[float, float] = (0.2, 1.0), rotate: float = 15.0,
                 hflip: float = 0.5, seed: int | None = None,
                 warp: Literal["image", "crop"] = "image") -> None:
        self.global_size = check_size("size", size)
        if warp not in ("image", "crop"):
            raise ValueError(f"warp must be image or crop, got {warp!r}")
        self.warp = warp
        self.rotate, self.hflip = float(rotate), float(hflip)
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
        self._seed_with(np.random.SeedSequence(seed))

    def reseed(self, key: Sequence[int]) -> None:
        self._seed_with(np.random.SeedSequence(self.seed, spawn_key=tuple(int(k) for k in key)))

    def _seed_with(self, seq: np.random.SeedSequence) -> None:
        _share_random_state(self.pipeline, seq)
        self.rng = np.random.default_rng(seq)

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        image = as_rgb(image)
        if self.warp == "crop":
            params = draw_params(self.rng, image.shape[0], image.shape[1], self.scale, self.rotate, self.hflip)
            return [to_tensor(render_view(image, params, self.global_size))]
        return [to_tensor(self.pipeline(image=image)["image"])]
