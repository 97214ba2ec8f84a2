"""Epoch-seeded sampling over a mix of sources, and a DataLoader that can resume mid-epoch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Sampler

from midol.utils.dist import rank, world_size


class WeightedSourceSampler(Sampler[int]):
    """Draw ``num_samples`` dataset indices per epoch.

    A source's weight is the relative sampling rate of each of its images: with weights
    ``[1, 3]`` an image of the second source is drawn three times as often as one of the first,
    so that source's share of the draws is ``3 n_2 / (n_1 + 3 n_2)``. To give two sources equal
    shares, use weights inversely proportional to their sizes.

    ``group_ids`` (the corpus's, from the sources' ``group_by``): a group's items share their
    source's weight, ``weight / (items in the group)``, so every group of a source is drawn
    equally often whatever its size (a 300-slice CT series as often as a one-image study).
    A group may not span two sources.

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
        group_ids: Sequence[int] | torch.Tensor | None = None,
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
        if group_ids is not None:
            gids = torch.as_tensor(group_ids, dtype=torch.long).flatten()
            if gids.shape != ids.shape or int(gids.min()) < 0:
                raise ValueError(f"group_ids must be {ids.numel()} ids >= 0, one per item, "
                                 f"got {gids.numel()}")
            size = int(gids.max()) + 1
            lo = torch.full((size,), len(weights), dtype=torch.long).scatter_reduce(0, gids, ids, "amin")
            hi = torch.full((size,), -1, dtype=torch.long).scatter_reduce(0, gids, ids, "amax")
            if bool((lo != hi)[hi >= 0].any()):
                raise ValueError("a group spans two sources (group ids must be numbered per source)")
            counts = torch.bincount(gids, minlength=size).to(torch.float64)
            self._item_weights = self._item_weights / counts[gids]
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


class Draw(NamedTuple):
    """One sample of an epoch as :class:`ResumableDataLoader` hands it to the dataset.

    ``position`` is the draw's place in the epoch's full order (over all ranks); datasets seed
    the sample's augmentation from ``(epoch, position)``, so it does not depend on the worker."""

    index: int
    epoch: int
    position: int


def _sampler_epoch(batch_sampler: Any) -> int:
    return int(getattr(getattr(batch_sampler, "sampler", None), "epoch", 0))


def _shard(batch_sampler: Any) -> tuple[int, int]:
    """(rank, world size) of the sharding: a DistributedSampler's own, else the process group's."""
    sampler = getattr(batch_sampler, "sampler", None)
    replicas = getattr(sampler, "num_replicas", None)
    if isinstance(replicas, int) and replicas >= 1:
        return int(getattr(sampler, "rank", 0)), replicas
    return rank(), world_size()


class _DrawBatches:
    """The index sampler of :class:`ResumableDataLoader`: batches of :class:`Draw`, and a
    one-shot ``skip`` of leading batches (index bookkeeping only: skipped images are never
    loaded)."""

    def __init__(self, batch_sampler: Any, draws: bool = True) -> None:
        self.batch_sampler = batch_sampler
        self.draws = draws
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[Draw] | list[int]]:
        # A generator: the skip is taken by the iteration that actually starts (torch's
        # multi-worker iterator calls iter() twice on creation and only advances the second).
        skip, self.skip = self.skip, 0
        epoch, (r, w) = _sampler_epoch(self.batch_sampler), _shard(self.batch_sampler)
        size = int(getattr(self.batch_sampler, "batch_size", 0) or 0)
        for b, batch in enumerate(self.batch_sampler):
            if b < skip:
                continue
            if not self.draws:  # a dataset indexed by plain ints (the task datasets)
                yield [int(i) for i in batch]
                continue
            # Sample k of rank r is entry k * w + r of the full epoch order (DistributedSampler
            # deals the entries out to the ranks in turn).
            first = b * (size or len(batch))
            yield [Draw(int(i), epoch, (first + j) * w + r) for j, i in enumerate(batch)]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes in the middle of an epoch and yields :class:`Draw` keys.

    Lightning stores :meth:`state_dict` in every checkpoint and hands it back to
    :meth:`load_state_dict` before the first batch of a resumed ``fit``; the loader then restarts
    the saved epoch's order at the first batch not yet trained (the skipped batches cost index
    arithmetic, no image decoding). Without this, Lightning restarts a resumed epoch from its
    first batch, so the run sees those images twice and diverges from an uninterrupted one.

    The dataset receives :class:`Draw` items instead of plain indices.

    Args:
        *args, **kwargs: as for ``DataLoader``; needs ``batch_size`` (not ``batch_sampler``).
        batches_done: returns how many batches of the current epoch training has finished.
            The loader cannot count this itself: workers and Lightning prefetch ahead of
            training. :class:`~midol.data.PretrainDataModule` passes Lightning's own counter.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], draws: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None:
            raise ValueError("ResumableDataLoader needs batch_size (batches are skipped whole)")
        self.batches_done = batches_done
        self._draws = _DrawBatches(self.batch_sampler, draws)

    @property
    def _index_sampler(self) -> _DrawBatches:  # type: ignore[override]
        # torch's iterators read their indices from here; one object, so a skip set by
        # load_state_dict reaches persistent workers' iterators too.
        return self._draws

    def state_dict(self) -> dict[str, int]:
        """Epoch, batches already trained in it, and the layout they were counted in."""
        return {
            "epoch": _sampler_epoch(self.batch_sampler),
            "batches_done": int(self.batches_done()),
            "num_batches": len(self),
            "batch_size": int(self.batch_size or 0),
            "world_size": _shard(self.batch_sampler)[1],
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration where the saved run stopped (see :meth:`state_dict`)."""
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        saved = (state.get("num_batches"), state.get("batch_size"), state.get("world_size"))
        now = (len(self), self.batch_size, _shard(self.batch_sampler)[1])
        if saved != now:
            # Same images, counted in the new layout: the order continues, not exactly.
            done = done * int(saved[1] or 1) * int(saved[2] or 1) // (int(now[1] or 1) * now[2])
            warnings.warn(
                f"resuming with (batches per epoch, batch size, world size) = {now}, but the "
                f"checkpoint was written with {saved}: the data order continues approximately "
                "(not exactly) from where the saved run stopped",
                stacklevel=2,
            )
        if done >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        set_epoch = getattr(getattr(self.batch_sampler, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self._draws.skip = done
