"""Datasets and collate functions of pre-training: views of corpus items, and centre crops of
every item once for routing tables and analysis."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from midol.data.batches import ImageBatch, ViewBatch
from midol.data.corpus import Corpus
from midol.data.image_io import UnreadableImageError, UnreadableImageWarning
from midol.data.sampler import Draw
from midol.data.sources import DataSource
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.eval import EvalTransform
from midol.errors import InputFileError, UnreadableStreakError

# The setup check decodes one item in READ_CHECK_STRIDE (<= max_tries, so any streak of
# max_tries unreadable items holds a checked one), at least READ_CHECK_MIN and at most
# READ_CHECK_MAX items: every streak is found in corpora up to 64 x 2048 = 131 072 items.
READ_CHECK_STRIDE = 64
READ_CHECK_MIN = 32
READ_CHECK_MAX = 2048


def skip_message(origin: str, err: UnreadableImageError) -> str:
    return f"{origin}: {err.reason}"


def warn_skipped(message: str) -> None:
    warnings.warn(f"skipping unreadable image {message}", UnreadableImageWarning, stacklevel=3)


def streak_message(count: int, start: int, n: int, skipped: Sequence[str], max_tries: int) -> str:
    """One line naming a streak of ``count`` unreadable items from item ``start``."""
    where = (f"all {n} images of the corpus are unreadable" if count >= n else
             f"{count} consecutive unreadable images starting at item {start} of {n}")
    shown = "; ".join(skipped[:5]) + (f"; ... ({count - 5} more)" if count > 5 else "")
    return (f"{where} (an unreadable image is replaced by one of the next {max_tries}, so "
            f"training cannot go on): {shown}. Fix or remove these files")


class _Readability:
    """Memoised ``corpus.load(i)`` success (cyclic index), with each failure's reason."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.n = len(corpus)
        self.reasons: dict[int, str | None] = {}

    def bad(self, i: int) -> bool:
        i %= self.n
        if i not in self.reasons:
            try:
                self.corpus.load(i)
                self.reasons[i] = None
            except UnreadableImageError as err:
                self.reasons[i] = skip_message(self.corpus.describe(i), err)
        return self.reasons[i] is not None

    def reason(self, i: int) -> str:
        return self.reasons[i % self.n] or ""


def check_readable(corpus: Corpus, max_tries: int = 64) -> int:
    """Decode a sample of the corpus proportional to its size (one item in
    ``READ_CHECK_STRIDE``, :data:`READ_CHECK_MIN` .. :data:`READ_CHECK_MAX` items, evenly
    spaced) and stop before training when :class:`PretrainDataset` could not go on: no
    readable image, or a streak of ``max_tries`` consecutive unreadable items around a
    sampled one (a folder of broken files). Warns with the share of unreadable sampled items;
    returns how many sampled items were unreadable."""
    n = len(corpus)
    k = min(n, max(READ_CHECK_MIN, -(-n // min(READ_CHECK_STRIDE, max_tries)) + 1), READ_CHECK_MAX)
    sample = sorted(set(np.rint(np.linspace(0, n - 1, k)).astype(np.int64).tolist()))
    seen = _Readability(corpus)
    bad = [i for i in sample if seen.bad(i)]
    if len(bad) == len(sample):
        try:  # the whole sample is broken: is anything readable at all?
            corpus.first_readable()
        except ValueError as err:
            raise InputFileError(str(err)) from err
    limit = min(max_tries, n)
    for i in bad:
        start = i
        while i - start + 1 < limit and seen.bad(start - 1) and (i - start + 1) < n:
            start -= 1  # back to the streak's first item (cyclic)
        end = i
        while end - start + 1 < limit and seen.bad(end + 1):
            end += 1
        if end - start + 1 >= limit:
            while end - start + 1 < min(n, READ_CHECK_MAX) and seen.bad(end + 1):
                end += 1  # the whole streak, for the message
            names = [seen.reason(j) for j in range(start, min(end + 1, start + 5))]
            raise UnreadableStreakError(
                "setup check: " + streak_message(end - start + 1, start % n, n, names, max_tries))
    if bad:
        warnings.warn(
            f"setup check: {len(bad)} of {len(sample)} sampled images are unreadable "
            f"({100 * len(bad) / len(sample):.1f}%; e.g. {seen.reason(bad[0])}); unreadable "
            "images are replaced by the next readable one during training", stacklevel=2)
    return len(bad)


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
                # reported through the batch ("skipped"): the training module warns once per file
                # for the whole run and counts the distinct files per epoch (issue 27 item 12;
                # a worker's warning repeated every epoch, from torch's file)
                skipped.append(skip_message(self.corpus.describe(j), err))
                continue
            return {"views": self.transform(image), "modality": self.corpus.modality(j),
                    "index": j, "skipped": skipped}
        raise UnreadableStreakError(streak_message(len(skipped), i, n, skipped, self.max_tries))


class ViewCollate:
    """Stack per-view tensors into a :class:`~midol.data.batches.ViewBatch`."""

    def __init__(self, num_global: int) -> None:
        self.num_global = num_global

    def __call__(self, batch: list[dict[str, Any]]) -> ViewBatch:
        num_views = len(batch[0]["views"])
        return {
            # default_collate stacks straight into shared memory inside a worker: without it the
            # worker stacks into ordinary memory and the loader copies the batch once more
            "views": [default_collate([b["views"][v] for b in batch]) for v in range(num_views)],
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
