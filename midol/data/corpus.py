"""The pre-training corpus: every item of several sources behind one flat index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from midol.data.image_io import UnreadableImageError
from midol.data.readers import ImageList
from midol.data.sources import DataSource, resolve_source


def unique_modalities(sources: Sequence[DataSource]) -> list[str]:
    """Modality names in order of first appearance."""
    return list(dict.fromkeys(s.modality for s in sources))


class Corpus:
    """All items of several sources behind one flat index (source after source, in order).

    ``group_ids``: each item's group over the whole corpus (a source's ``group_by`` groups,
    numbered source after source; an ungrouped item is its own group); ``group_counts``: the
    groups of each source. The sampler divides a source's weight among a group's items.
    """

    def __init__(self, sources: Sequence[DataSource]) -> None:
        if not sources:
            raise ValueError("no data source given: list at least one DataSource (data.sources)")
        self.sources: list[ImageList] = [resolve_source(s) for s in sources]
        self.modalities = unique_modalities(sources)
        sizes = [len(s) for s in self.sources]
        if sum(sizes) == 0:
            raise ValueError("the corpus has no image (all sources are empty)")
        self.source_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._modality_of_source = [self.modalities.index(s.modality) for s in sources]
        ids: list[np.ndarray] = []
        self.group_counts: list[int] = []
        for lst in self.sources:
            keys = lst.group_keys()
            if keys is None:
                local = np.arange(len(lst), dtype=np.int64)
            else:
                # numbered by first appearance, so ids follow the listing order
                local = np.unique(np.asarray(keys, dtype=object), return_inverse=True)[1].astype(np.int64)
                _, first = np.unique(local, return_index=True)
                local = np.argsort(np.argsort(first))[local]
            ids.append(local + sum(self.group_counts))
            self.group_counts.append(int(local.max()) + 1 if len(local) else 0)
        self.group_ids = torch.from_numpy(np.concatenate(ids)) if ids else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.source_ids.numel())

    def locate(self, i: int) -> tuple[ImageList, int]:
        s = int(self.source_ids[i])
        return self.sources[s], i - int(self._starts[s])

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 ``H x W x 3``; raises ``UnreadableImageError``."""
        src, j = self.locate(i)
        return src.load(j)

    def describe(self, i: int) -> str:
        src, j = self.locate(i)
        return src.describe(j)

    def modality(self, i: int) -> int:
        return self._modality_of_source[int(self.source_ids[i])]

    def first_readable(self) -> int:
        """Index of the first decodable item; ``ValueError`` listing reasons when there is none."""
        errors: list[str] = []
        for i in range(len(self)):
            try:
                self.load(i)
                return i
            except UnreadableImageError as err:
                errors.append(f"{err.path}: {err.reason}")
        shown = "; ".join(errors[:5]) + (
            f"; ... ({len(errors) - 5} more)" if len(errors) > 5 else ""
        )
        raise ValueError(f"no readable image in the corpus ({len(errors)} files tried): {shown}")
