"""Epoch-seeded sampling over a mix of sources with per-source weights."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class WeightedSourceSampler(Sampler[int]):
    """Draw ``num_samples`` dataset indices per epoch.

    A source's weight is the relative sampling rate of each of its images: with weights
    ``[1, 3]`` an image of the second source is drawn three times as often as one of the first,
    so that source's share of the draws is ``3 n_2 / (n_1 + 3 n_2)``. To give two sources equal
    shares, use weights inversely proportional to their sizes.

    * All weights equal (the default): a seeded random permutation of the items (no
      replacement; when ``num_samples`` exceeds the dataset, further permutations are
      appended). Sources contribute in proportion to their size.
    * Otherwise: ``num_samples`` draws with replacement, item ``i`` with probability
      proportional to its source's weight.

    The order depends only on ``seed + epoch`` (:meth:`set_epoch`; Lightning calls it, also
    through its distributed wrapper).
    """

    def __init__(
        self,
        source_ids: Sequence[int] | torch.Tensor,
        weights: Sequence[float],
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        ids = torch.as_tensor(source_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("WeightedSourceSampler needs at least one item")
        if ids.min() < 0 or ids.max() >= len(weights):
            raise ValueError(
                f"source ids must lie in [0, {len(weights)}), got {ids.min()}..{ids.max()}"
            )
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        if not bool((w > 0).all()):
            raise ValueError(f"source weights must be > 0, got {list(weights)}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.source_ids = ids
        self.num_samples = int(num_samples) if num_samples is not None else int(ids.numel())
        self.seed = seed
        self.epoch = 0
        self._item_weights = w[ids]
        self._uniform = bool(torch.all(self._item_weights == self._item_weights[0]))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def expected_shares(self) -> list[float]:
        """Each source's expected fraction of the draws."""
        totals = torch.zeros(int(self.source_ids.max()) + 1, dtype=torch.float64)
        totals.index_add_(0, self.source_ids, self._item_weights)
        return (totals / totals.sum()).tolist()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = int(self.source_ids.numel())
        if self._uniform:
            reps = -(-self.num_samples // n)
            idx = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[: self.num_samples]
        else:
            idx = torch.multinomial(self._item_weights, self.num_samples, replacement=True, generator=g)
        return iter(idx.tolist())
