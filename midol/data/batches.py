"""The batches midol's loaders produce, as declared types (what a method may read)."""

from __future__ import annotations

from typing import TypedDict

import torch


class ViewBatch(TypedDict):
    """A pre-training batch: ``views`` is a list of M uint8 ``B x 3 x H x W`` tensors, global
    views first (``num_global`` of them); ``modality`` (B,) indexes the datamodule's
    ``modalities`` and is for monitoring only; ``index`` (B,) the items returned; ``skipped``
    the unreadable files replaced in this batch, as ``"path: reason"``."""

    views: list[torch.Tensor]
    num_global: int
    modality: torch.Tensor
    index: torch.Tensor
    skipped: list[str]


class ImageBatch(TypedDict):
    """Centre-cropped corpus images for routing and analysis (unreadable files dropped, so a
    batch may be smaller than asked or empty)."""

    image: torch.Tensor
    modality: torch.Tensor
    index: torch.Tensor
    path: list[str]
    skipped: list[str]


class LabelledBatch(TypedDict):
    """Labelled images: ``target`` is (B,) int64 class ids, (B, L) float32 0/1 labels, or
    (B, H, W) int64 masks."""

    image: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
