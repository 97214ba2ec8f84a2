"""Loader settings and split handling shared by the labelled datamodules (classification,
segmentation, patients)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from midol.data.loader_utils import batches_trained, check_loader_args, worker_init
from midol.data.sampler import ResumableDataLoader, WeightedSourceSampler
from midol.data.splits import seeded_split


class TaskDataModule(L.LightningDataModule):
    """Loader settings and split handling shared by the labelled datamodules.

    Args:
        val_fraction: fraction of the training source split off as validation when no val
            source is given.
        test_fraction: fraction split off as test when no test source is given.
        split_seed: seed of those splits (stratified by class where labels allow).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size (default: batch_size).
        num_workers: data-loader worker processes.
        drop_last: drop the last incomplete training batch.
        pin_memory: pinned host memory for faster copies (only with CUDA).
        persistent_workers: keep workers alive between epochs.
    """

    def __init__(
        self,
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        drop_last: bool = True,
        pin_memory: bool = True,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 "
                "and sum to < 1"
            )
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.datasets: dict[str, Dataset] = {}

    def carve(self, train: Any, strata: np.ndarray | None, have_val: bool, have_test: bool) -> dict[str, Any]:
        """Split ``train`` (anything with ``subset``) into the stages not given as sources."""
        fractions = {"val": 0.0 if have_val else self.val_fraction,
                     "test": 0.0 if have_test else self.test_fraction}
        if have_val and self.val_fraction:
            raise ValueError("set either a val source or val_fraction, not both")
        if have_test and self.test_fraction:
            raise ValueError("set either a test source or test_fraction, not both")
        rest, val_idx, test_idx = seeded_split(len(train), [fractions["val"], fractions["test"]],
                                               self.split_seed, strata)
        out = {"train": train.subset(rest)}
        if fractions["val"]:
            out["val"] = train.subset(val_idx)
        if fractions["test"]:
            out["test"] = train.subset(test_idx)
        return out

    def _loader(self, stage: str, train: bool) -> DataLoader:
        if not self.datasets:
            self.setup("fit")
        dataset = self.datasets.get(stage)
        if dataset is None:
            return []  # type: ignore[return-value]  # Lightning skips a stage without batches
        if train and self.drop_last and len(dataset) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} images, fewer than batch_size="
                f"{self.batch_size} with drop_last: lower batch_size or set drop_last: false"
            )
        if train:
            seed = torch.initial_seed() % 2**31  # follows seed_everything
            reseed = getattr(getattr(dataset, "transform", None), "set_seed", None)
            if callable(reseed):  # main-process loading: follow seed_everything
                reseed(torch.initial_seed() % 2**32)
            # The order of an epoch depends only on (seed, epoch), and a resumed run skips the
            # batches its checkpoint already trained: fine-tuning and MedMIX resume exactly
            # (issue 26 item 14; a plain shuffle drew its order from the global RNG).
            return ResumableDataLoader(
                dataset,
                sampler=WeightedSourceSampler(torch.zeros(len(dataset), dtype=torch.long), [1.0],
                                              seed=seed),
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                persistent_workers=self.persistent_workers and self.num_workers > 0,
                worker_init_fn=worker_init,
                generator=torch.Generator().manual_seed(seed),
                batches_done=lambda: batches_trained(self.trainer),
                draws=False,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=worker_init,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.datasets.items()}
