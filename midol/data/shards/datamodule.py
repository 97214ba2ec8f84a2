"""The streaming pre-training datamodule over shards written by ``midol shard``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from midol.data.loader_utils import worker_init
from midol.data.pretrain_datasets import RoutingCollate
from midol.data.shards.index import ShardIndex
from midol.data.shards.stream import EvalStream, ShardLoader, ShardStream
from midol.data.transforms.base import ViewTransform
from midol.data.view_datamodule import ViewDataModule
from midol.utils.dist import world_size


class ShardedPretrainDataModule(ViewDataModule):
    """Multi-crop views streamed from WebDataset shards (see :func:`write_shards`).

    Batches are those of :class:`~midol.data.PretrainDataModule`, with ``index`` the sample's
    position in the epoch. Use it for collections too large to list or hold locally.

    Args:
        index: ``index.json`` written by ``midol shard`` (or its folder).
        modality_weights: share of the draws per modality (normalised), e.g.
            ``{fundus: 1, xray: 2}``; unlisted modalities get 0 (left out). None: in
            proportion to the sample counts (every image equally likely).
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes.
        transform: image -> views (as ``PretrainDataModule``; default: multi-crop).
        samples_per_epoch: draws per epoch over all devices (default: the corpus size).
        shuffle_buffer: samples held per modality and worker for shuffling (memory: buffer x
            modalities x workers x mean encoded image size).
        seed: seed of the streams, modality draws and augmentations.
        pin_memory: pin batches in page-locked memory (only used when CUDA is available).
        persistent_workers: keep workers alive between epochs.
        eval_size: image side for ``routing_dataloader`` (default: the transform's global size).
    """

    def __init__(
        self,
        index: str,
        modality_weights: dict[str, float] | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        transform: ViewTransform | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 200,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, transform, seed, pin_memory, persistent_workers, eval_size,
        )
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.shard_index = ShardIndex.load(index)
        self.weights = self._weights(modality_weights)
        self.samples_per_epoch = samples_per_epoch or self.shard_index.num_samples()
        self.shuffle_buffer = shuffle_buffer

    def _weights(self, given: dict[str, float] | None) -> dict[str, float]:
        idx = self.shard_index
        if given is None:
            return {m: float(idx.num_samples(m)) for m in idx.modalities}
        unknown = sorted(set(given) - set(idx.modalities))
        if unknown:
            raise ValueError(
                f"modality_weights names {unknown}, not in the shards "
                f"(modalities: {', '.join(idx.modalities)})"
            )
        weights = {m: float(given.get(m, 0.0)) for m in idx.modalities}
        if any(not w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"modality_weights must be >= 0 with a positive sum, got {given}")
        return weights

    @property
    def modalities(self) -> list[str]:
        return self.shard_index.modalities

    def expected_shares(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {m: w / total for m, w in self.weights.items()}

    def train_dataloader(self) -> ShardLoader:
        per_rank = self.samples_per_epoch // world_size()
        batches = per_rank // self.batch_size
        if batches < 1:
            raise ValueError(
                f"an epoch has {per_rank} samples per device, fewer than batch_size="
                f"{self.batch_size}; lower batch_size or raise samples_per_epoch"
            )
        stream = ShardStream(
            self.shard_index, self.transform, self.weights, self.batch_size, batches,
            seed=self.seed, shuffle_buffer=self.shuffle_buffer,
        )
        return ShardLoader(stream, **self.train_loader_kwargs())

    def routing_dataloader(self, batch_size: int | None = None,
                           max_images: int | None = None) -> DataLoader[dict[str, Any]]:
        """Every sample once, as ``eval_size`` centre crops (batches as
        :meth:`PretrainDataModule.routing_dataloader`; ``index`` numbers the samples in index
        order, modality after modality; ``path`` is the origin recorded at writing)."""
        if max_images is not None:
            raise ValueError("PretrainSummary max_images: a capped sample is not offered for a "
                             "sharded corpus (its stream has no random access); set it to null")
        return DataLoader(
            EvalStream(self.shard_index, self.eval_size),
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
            collate_fn=RoutingCollate(self.eval_size),
            worker_init_fn=worker_init,
        )
