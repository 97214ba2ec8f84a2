"""The pre-training datamodule over image sources (folders, CSV lists, MedMNIST ``.npz``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from midol.data.corpus import Corpus, unique_modalities
from midol.data.loader_utils import worker_init
from midol.data.pretrain_datasets import (
    PretrainDataset,
    RoutingCollate,
    RoutingDataset,
    check_readable,
)
from midol.data.sampler import ResumableDataLoader, WeightedSourceSampler
from midol.data.sources import DataSource, source_table
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.eval import EvalTransform
from midol.data.view_datamodule import ViewDataModule


class PretrainDataModule(ViewDataModule):
    """Unlabelled multi-modality images as views for self-supervised pre-training.

    Batches are :class:`~midol.data.batches.ViewBatch`: M uint8 views, global views first,
    ``modality`` indexing :attr:`modalities` (for monitoring only). Pixels stay uint8 and are
    normalised on the device.

    Args:
        sources: Image sources (folders, CSV lists, MedMNIST-style npz), each with a modality name.
        transform: Image -> views (``class_path``): ``midol.data.MultiCropTransform`` (default,
            2 global + 6 local views at 224 px) or any ``ViewTransform`` subclass.
        batch_size: Images per batch (per device).
        num_workers: DataLoader worker processes (0 = load in the main process).
        samples_per_epoch: Draws per epoch (default: the corpus size).
        seed: Seed of the sampling order (plus the epoch) and of the augmentations.
        pin_memory: Pin batches in page-locked memory (only used when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only used with num_workers > 0).
        eval_size: Image side for ``routing_dataloader`` (default: the transform's global size).
    """

    def __init__(
        self,
        sources: list[DataSource],
        transform: ViewTransform | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, transform, seed, pin_memory, persistent_workers,
                         eval_size)
        self.sources = list(sources)
        self.samples_per_epoch = samples_per_epoch
        self.corpus: Corpus | None = None
        self.dataset: PretrainDataset | None = None

    @property
    def modalities(self) -> list[str]:
        """Unique modality names in source order; batch ``"modality"`` values index this list."""
        return unique_modalities(self.sources)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the sources and decode a sample proportional to the corpus
        (:func:`~midol.data.pretrain_datasets.check_readable`): no readable image, or a streak
        of unreadable files the dataset cannot replace, stops here rather than mid-epoch."""
        if self.dataset is not None:
            return
        if not self.sources:
            raise ValueError(
                "PretrainDataModule: `sources` is empty; list at least one DataSource "
                "(data.sources in the config)"
            )
        corpus = Corpus(self.sources)
        rank_zero_info("pre-training corpus:\n" + source_table(
            list(self.sources), [len(s) for s in corpus.sources], corpus.group_counts))
        dataset = PretrainDataset(corpus, self.transform)
        check_readable(corpus, dataset.max_tries)
        self.corpus = corpus
        self.dataset = dataset

    def _require_setup(self) -> tuple[Corpus, PretrainDataset]:
        if self.dataset is None or self.corpus is None:
            self.setup("fit")
        assert self.corpus is not None and self.dataset is not None
        return self.corpus, self.dataset

    def train_dataloader(self) -> DataLoader[Any]:
        corpus, dataset = self._require_setup()
        sampler = WeightedSourceSampler(
            corpus.source_ids, [s.weight for s in self.sources],
            num_samples=self.samples_per_epoch, seed=self.seed, group_ids=corpus.group_ids,
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"an epoch has {len(sampler)} samples, fewer than batch_size={self.batch_size} "
                "(batches are dropped when incomplete); lower batch_size or raise samples_per_epoch"
            )
        return ResumableDataLoader(
            dataset, sampler=sampler, **self.train_loader_kwargs(),
            # Its own generator: worker seeds then never consume the global torch RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def routing_dataloader(self, batch_size: int | None = None,
                           max_images: int | None = None) -> DataLoader[Any]:
        """Every item once, in corpus order, as ``eval_size`` centre crops
        (:class:`~midol.data.batches.ImageBatch`). Unreadable files are dropped (warned and listed
        in ``"skipped"``), not replaced, so a batch can be smaller than ``batch_size`` or empty.
        ``max_images``: at most that many, evenly spaced over the corpus (every source keeps its
        share), for a summary of a corpus too large to route whole.
        """
        corpus, _ = self._require_setup()
        dataset: Dataset[Any] = RoutingDataset(corpus, EvalTransform(self.eval_size))
        if max_images is not None and max_images < len(corpus):
            if max_images < 1:
                raise ValueError(f"max_images must be >= 1, got {max_images}")
            picks = torch.linspace(0, len(corpus) - 1, max_images).round().long().unique().tolist()
            dataset = Subset(dataset, picks)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=RoutingCollate(self.eval_size),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            worker_init_fn=worker_init,
        )
