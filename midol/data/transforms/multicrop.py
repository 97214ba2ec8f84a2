"""DINO's multi-crop views (M-IDoL Sec. 3.1; docs/papers/m-idol.md, 'Views'): global and local
crops with DINO's augmentations, as uint8 ``C x H x W`` tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from midol.data.image_io import as_rgb
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.common import check_scale, check_size, to_tensor

# torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) as explicit factor ranges: albumentations reads a
# tuple as the range itself, so nothing depends on how a scalar would be expanded.
_JITTER = {
    "brightness": (0.6, 1.4),
    "contrast": (0.6, 1.4),
    "saturation": (0.8, 1.2),
    "hue": (-0.1, 0.1),
}


def _view_pipeline(
    size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
) -> A.Compose:
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(size, size),
            scale=scale,
            interpolation=cv2.INTER_CUBIC,
            area_for_downscale="image",
        ),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(**_JITTER, p=0.8),
        A.ToGray(num_output_channels=3, p=0.2),
        # blur_limit=0: kernel size follows sigma as in PIL's GaussianBlur (used by DINO).
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=blur_p),
    ]
    if solarize_p > 0:
        ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=solarize_p))  # invert >= 128, as PIL
    return A.Compose(ops)


def _share_random_state(
    pipes: A.Compose | Sequence[A.Compose], seed: np.random.SeedSequence
) -> None:
    # One numpy and one Python generator shared by every transform of the pipelines.
    # Compose.set_random_seed would give each transform its own generator with the *same* seed,
    # so their first draws coincide: flip, jitter, grayscale and blur decisions become correlated.
    state = seed.generate_state(2, dtype=np.uint64)
    rng, py_rng = np.random.default_rng(int(state[0])), random.Random(int(state[1]))
    for pipe in [pipes] if isinstance(pipes, A.Compose) else pipes:
        pipe.set_random_state(rng, py_rng)


class MultiCropTransform(ViewTransform):
    """DINO multi-crop: ``num_global`` global views then ``num_local`` local views.

    Global view 1: blur p=1.0; global view 2: blur p=0.1 + solarize p=0.2; further global views
    repeat view 2's recipe; local views: blur p=0.5. All views: bicubic random-resized crop,
    horizontal flip p=0.5, colour jitter p=0.8, grayscale p=0.2.

    Albumentations keeps its own random state (not ``np.random``), so every DataLoader worker
    must call :meth:`set_seed` with a distinct seed, or all workers produce the same crops;
    or, as :class:`~midol.data.PretrainDataset` does, :meth:`reseed` each sample from its draw.
    Inside a datamodule, the datamodule's ``seed`` replaces ``seed``.

    Args:
        global_size: Side of the global views in pixels.
        local_size: Side of the local views (224 as in the M-IDoL authors' code; 96 as in DINO),
            at most ``global_size``.
        num_global: Number of global views (the teacher's views).
        num_local: Number of local views.
        global_scale: Area range of the global random-resized crops.
        local_scale: Area range of the local random-resized crops.
        seed: Base seed of the augmentations (None: fresh entropy).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 224,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        seed: int | None = None,
    ) -> None:
        if num_global < 1:
            raise ValueError(f"num_global must be >= 1, got {num_global}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        if num_global + num_local < 2:
            raise ValueError(
                f"need at least 2 views for cross-view losses, got {num_global}+{num_local}"
            )
        self.global_size = check_size("global_size", global_size)
        self.local_size = check_size("local_size", local_size)
        if num_local > 0 and local_size > global_size:
            raise ValueError(
                f"local_size must be <= global_size={global_size} (local views are the smaller "
                f"crops), got {local_size}"
            )
        self.num_global, self.num_local = num_global, num_local
        self.global_scale = check_scale("global_scale", global_scale)
        self.local_scale = check_scale("local_scale", local_scale)
        self.global1 = _view_pipeline(global_size, self.global_scale, blur_p=1.0, solarize_p=0.0)
        self.global2 = _view_pipeline(global_size, self.global_scale, blur_p=0.1, solarize_p=0.2)
        self.local = _view_pipeline(local_size, self.local_scale, blur_p=0.5, solarize_p=0.0)
        # Base of reseed(); None draws fresh entropy once, so keyed views stay consistent.
        self.seed = int(np.random.SeedSequence(seed).entropy)  # type: ignore[arg-type]
        self.set_seed(self.seed)

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def set_seed(self, seed: int | None) -> None:
        """Reseed the three pipelines with independent streams (``None``: fresh entropy).

        Leaves :attr:`seed`, the base of :meth:`reseed`, unchanged."""
        streams = np.random.SeedSequence(seed).spawn(3)
        for pipe, ss in zip((self.global1, self.global2, self.local), streams, strict=True):
            _share_random_state(pipe, ss)

    def reseed(self, key: Sequence[int]) -> None:
        """Make the next call's views a pure function of (seed, key, image).

        :class:`~midol.data.PretrainDataset` calls this with (epoch, draw position) so the
        augmentations do not depend on which worker produced a sample, and a resumed run
        draws the same crops as an uninterrupted one. Costs ~30 us per call.
        """
        _share_random_state(
            (self.global1, self.global2, self.local),
            np.random.SeedSequence(self.seed, spawn_key=tuple(int(k) for k in key)),
        )

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        image = as_rgb(image)
        views = [self.global1(image=image)["image"]]
        views += [self.global2(image=image)["image"] for _ in range(self.num_global - 1)]
        views += [self.local(image=image)["image"] for _ in range(self.num_local)]
        return [to_tensor(v) for v in views]
