"""The interface of a pre-training view transform: one image in, a list of views out.

A pre-training datamodule takes any subclass as its ``transform`` (a ``class_path`` in YAML):
:class:`~midol.data.transforms.MultiCropTransform` (DINO / M-IDoL, the default) or a single-view
transform (MAE). The datamodule seeds it (``set_base_seed``) and the dataset re-seeds it per
sample (``reseed``), so a resumed run draws the same views as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ViewTransform:
    """Base class: ``__call__(image) -> [view_1, ..., view_M]``, global views first.

    Attributes set by subclasses: ``num_global`` (how many leading views are global crops, the
    teacher's views in M-IDoL), ``num_views`` and ``global_size`` (the side of the global views,
    recorded with an export and used for evaluation crops).
    """

    num_global: int = 1
    global_size: int = 224

    @property
    def num_views(self) -> int:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        raise NotImplementedError

    def set_base_seed(self, seed: int) -> None:
        """The base of :meth:`reseed` (the datamodule passes its ``seed``)."""
        self.seed = int(seed)
        self.set_seed(seed)

    def set_seed(self, seed: int | None) -> None:
        """Reseed the random state directly (a data worker with its own seed)."""

    def reseed(self, key: Sequence[int]) -> None:
        """Make the next call's views a pure function of (base seed, key, image)."""
