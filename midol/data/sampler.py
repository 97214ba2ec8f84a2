"""Epoch-seeded sampling over a mix of sources with per-source weights."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class WeightedSourceSampler(Sampler[int]):
    """Draw ``num_samples`` dataset indices per epoch.

    * All weights equal: a seeded random permutation of the items (no replacement; when
      ``num_samples`` exceeds the dataset, further permutations are appended). Sources then
      contribute in proportion to their size.
    * Otherwise the weights are the sources' shares of the draws, whatever their sizes: source
      ``s`` gets ``round(num_samples * w_s / sum(w))`` draws (largest remainder), each an item of
      ``s`` picked uniformly with replacement; the draws are then shuffled together.

    The order depends only on ``seed + epoch`` (:meth:`set_epoch`; Lightning calls it).
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
            raise ValueError(f"source ids must lie in [0, {len(weights)}), got {ids.min()}..{ids.max()}")
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        if not bool((w > 0).all()):
            raise ValueError(f"source weights must be > 0, got {list(weights)}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.source_ids = ids
        self.weights = w
        self.num_samples = int(num_samples) if num_samples is not None else int(ids.numel())
        self.seed = seed
        self.epoch = 0
        # Items of each source; a source with no item cannot receive draws.
        self._members = [torch.nonzero(ids == s).flatten() for s in range(len(w))]
        active = torch.tensor([len(m) > 0 for m in self._members])
        self._uniform = bool(torch.all(w[active] == w[active][0]))
        self._shares = torch.where(active, w, torch.zeros_like(w))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def counts(self) -> list[int]:
        """Draws per source in the weighted mode (largest-remainder rounding)."""
        share = self._shares / self._shares.sum() * self.num_samples
        counts = share.floor().long()
        remainder = self.num_samples - int(counts.sum())
        if remainder:
            # Ties go to the lower source index (stable sort) so the result is deterministic.
            order = torch.sort(share - counts, descending=True, stable=True).indices
            counts[order[:remainder]] += 1
        return counts.tolist()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = int(self.source_ids.numel())
        if self._uniform:
            reps = -(-self.num_samples // n)
            idx = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[: self.num_samples]
        else:
            parts = [
                members[torch.randint(len(members), (count,), generator=g)]
                for members, count in zip(self._members, self.counts())
                if count > 0
            ]
            idx = torch.cat(parts)
            idx = idx[torch.randperm(len(idx), generator=g)]
        return iter(idx.tolist())
