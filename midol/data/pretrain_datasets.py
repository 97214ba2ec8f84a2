"""Datasets and collate functions of pre-training: views of corpus items, and centre crops of
every item once for routing tables and analysis."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from midol.data.batches import ImageBatch, ViewBatch
from midol.data.corpus import Corpus
from midol.data.image_io import UnreadableImageError, UnreadableImageWarning
from midol.data.sampler import Draw
from midol.data.sources import DataSource
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.eval import EvalTransform


def skip_message(origin: str, err: UnreadableImageError) -> str:
    return f"{origin}: {err.reason}"


def warn_skipped(message: str) -> None:
    warnings.warn(f"skipping unreadable image {message}", UnreadableImageWarning, stacklevel=3)


class PretrainDataset(Dataset[dict[str, Any]]):
    """The views of every corpus item.

    An unreadable item is replaced by the next readable one (``i+1, i+2, ...`` modulo the length,
    at most ``max_tries`` items) so batches keep their size; each replaced file is warned about
    (:class:`UnreadableImageWarning`) and listed in ``"skipped"`` as ``"path: reason"``.
    ``"index"`` is the item actually returned. Items may be plain indices or
    :class:`~midol.data.sampler.Draw` keys, which also seed the transform (``reseed``).
    """

    def __init__(
        self,
        sources: Sequence[DataSource] | Corpus,
        transform: ViewTransform,
        max_tries: int = 64,
    ) -> None:
        self.corpus = sources if isinstance(sources, Corpus) else Corpus(sources)
        self.transform = transform
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int | Draw) -> dict[str, Any]:
        # A Draw (from ResumableDataLoader) seeds this sample's augmentation from its epoch and
        # draw position: the same crops whichever worker runs it, and after a resume.
        if isinstance(i, Draw):
            self.transform.reseed((i.epoch, i.position))
            i = i.index
        n = len(self.corpus)
        skipped: list[str] = []
        for k in range(min(self.max_tries, n)):
            j = (i + k) % n
            try:
                image = self.corpus.load(j)
            except UnreadableImageError as err:
                msg = skip_message(self.corpus.describe(j), err)
                warn_skipped(msg)
                skipped.append(msg)
                continue
            return {"views": self.transform(image), "modality": self.corpus.modality(j),
                    "index": j, "skipped": skipped}
        raise RuntimeError(
            f"no readable image among {len(skipped)} consecutive items starting at index {i}: "
            + "; ".join(skipped[:5])
        )


class ViewCollate:
    """Stack per-view tensors into a :class:`~midol.data.batches.ViewBatch`."""

    def __init__(self, num_global: int) -> None:
        self.num_global = num_global

    def __call__(self, batch: list[dict[str, Any]]) -> ViewBatch:
        num_views = len(batch[0]["views"])
        return {
            "views": [torch.stack([b["views"][v] for b in batch]) for v in range(num_views)],
            "num_global": self.num_global,
            "modality": torch.tensor([b["modality"] for b in batch], dtype=torch.long),
            "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
            "skipped": [s for b in batch for s in b["skipped"]],
        }


class RoutingDataset(Dataset[dict[str, Any]]):
    """Every corpus item once, centre-cropped; unreadable items come back as a skip marker."""

    def __init__(self, corpus: Corpus, transform: EvalTransform) -> None:
        self.corpus = corpus
        self.transform = transform

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = self.corpus.load(i)
        except UnreadableImageError as err:
            msg = skip_message(self.corpus.describe(i), err)
            warn_skipped(msg)
            return {"skipped": msg}
        return {"image": self.transform(image), "modality": self.corpus.modality(i), "index": i,
                "path": self.corpus.describe(i)}


class RoutingCollate:
    """Collate for :class:`RoutingDataset`: drops skip markers (batches may shrink or be empty)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: list[dict[str, Any]]) -> ImageBatch:
        ok = [b for b in batch if "image" in b]
        images = (
            torch.stack([b["image"] for b in ok])
            if ok
            else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        )
        return {
            "image": images,
            "modality": torch.tensor([b["modality"] for b in ok], dtype=torch.long),
            "index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
            "path": [b["path"] for b in ok],
            "skipped": [b["skipped"] for b in batch if "skipped" in b],
        }
