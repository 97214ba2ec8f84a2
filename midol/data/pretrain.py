"""Pre-training corpus, datasets, collate functions and the LightningDataModule."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from midol.data.image_io import UnreadableImageError, UnreadableImageWarning
from midol.data.multicrop_module import MultiCropDataModule
from midol.data.sampler import Draw, ResumableDataLoader, WeightedSourceSampler
from midol.data.sources import DataSource, ResolvedSource, resolve_source
from midol.data.transforms import EvalTransform


def unique_modalities(sources: Sequence[DataSource]) -> list[str]:
    """Modality names in order of first appearance."""
    return list(dict.fromkeys(s.modality for s in sources))


class Corpus:
    """All items of several sources behind one flat index (source after source, in order)."""

    def __init__(self, sources: Sequence[DataSource]) -> None:
        if not sources:
            raise ValueError("no data source given: list at least one DataSource (data.sources)")
        self.sources: list[ResolvedSource] = [resolve_source(s) for s in sources]
        self.modalities = unique_modalities(sources)
        sizes = [len(s) for s in self.sources]
        if sum(sizes) == 0:
            raise ValueError("the corpus has no image (all sources are empty)")
        self.source_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._modality_of_source = [self.modalities.index(s.modality) for s in sources]

    def __len__(self) -> int:
        return int(self.source_ids.numel())

    def locate(self, i: int) -> tuple[ResolvedSource, int]:
        s = int(self.source_ids[i])
        return self.sources[s], i - int(self._starts[s])

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 ``H x W x 3``; raises ``UnreadableImageError``."""
        src, j = self.locate(i)
        return src.load(j)

    def describe(self, i: int) -> str:
        src, j = self.locate(i)
        return src.describe_item(j)

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


def _skip_message(corpus: Corpus, i: int, err: UnreadableImageError) -> str:
    return f"{corpus.describe(i)}: {err.reason}"


class PretrainDataset(Dataset[dict[str, Any]]):
    """Multi-crop views of every corpus item.

    An unreadable item is replaced by the next readable one (``i+1, i+2, ...`` modulo the length,
    at most ``max_tries`` items) so batches keep their size; each replaced file is warned about
    (:class:`UnreadableImageWarning`) and listed in ``"skipped"`` as ``"path: reason"``.
    ``"index"`` is the item actually returned. Items may be plain indices or
    :class:`~midol.data.sampler.Draw` keys, which also seed the transform (``reseed``).
    """

    def __init__(
        self,
        sources: Sequence[DataSource] | Corpus,
        transform: Callable[[np.ndarray], list[torch.Tensor]],
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
        reseed = getattr(self.transform, "reseed", None)
        if isinstance(i, Draw):
            if callable(reseed):
                reseed((i.epoch, i.position))
            i = i.index
        n = len(self.corpus)
        skipped: list[str] = []
        for k in range(min(self.max_tries, n)):
            j = (i + k) % n
            try:
                image = self.corpus.load(j)
            except UnreadableImageError as err:
                msg = _skip_message(self.corpus, j, err)
                warnings.warn(
                    f"skipping unreadable image {msg}", UnreadableImageWarning, stacklevel=2
                )
                skipped.append(msg)
                continue
            views = self.transform(image)
            return {
                "views": views,
                "modality": self.corpus.modality(j),
                "index": j,
                "skipped": skipped,
            }
        raise RuntimeError(
            f"no readable image among {len(skipped)} consecutive items starting at index {i}: "
            + "; ".join(skipped[:5])
        )


def pretrain_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-view tensors: ``views`` is a list of M uint8 ``B x 3 x H x W`` tensors."""
    num_views = len(batch[0]["views"])
    return {
        "views": [torch.stack([b["views"][v] for b in batch]) for v in range(num_views)],
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
            msg = _skip_message(self.corpus, i, err)
            warnings.warn(f"skipping unreadable image {msg}", UnreadableImageWarning, stacklevel=2)
            return {"skipped": msg}
        return {
            "image": self.transform(image),
            "modality": self.corpus.modality(i),
            "index": i,
            "path": self.corpus.describe(i),
        }


class RoutingCollate:
    """Collate for :class:`RoutingDataset`: drops skip markers (batches may shrink or be empty)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
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


def _init_worker(worker_id: int) -> None:
    # Albumentations ignores np.random/torch seeds: give each worker its own augmentation stream
    # (info.seed differs per worker and derives from the main process's torch seed).
    cv2.setNumThreads(0)  # no OpenCV thread pool per worker: the workers are the parallelism
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, PretrainDataset):
        reseed = getattr(info.dataset.transform, "set_seed", None)
        if callable(reseed):
            reseed(info.seed % 2**32)


class PretrainDataModule(MultiCropDataModule):
    """Unlabelled multi-modality images as multi-crop views for self-supervised pre-training.

    Batches: ``{"views": [M x (B, 3, H, W) uint8], "modality": (B,), "index": (B,), "skipped":
    [str]}``, global views first. ``modality`` indexes :attr:`modalities` and is for monitoring
    only. Pixels stay uint8; normalise on the device with ``IMAGENET_MEAN``/``IMAGENET_STD``.

    Args:
        sources: Image sources (folders, CSV lists, MedMNIST-style npz), each with a modality name.
        batch_size: Images per batch (per device).
        num_workers: DataLoader worker processes (0 = load in the main process).
        global_size: Side of the global views in pixels.
        local_size: Side of the local views (224 as in the authors' code; 96 as in DINO).
        num_global: Number of global views.
        num_local: Number of local views.
        global_scale: Area range of the global random-resized crops.
        local_scale: Area range of the local random-resized crops.
        samples_per_epoch: Draws per epoch (default: the corpus size).
        seed: Seed of the sampling order (plus the epoch) and of the in-process augmentations.
        pin_memory: Pin batches in page-locked memory (only used when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only used with num_workers > 0).
        eval_size: Image side for ``routing_dataloader`` (default: global_size).
    """

    def __init__(
        self,
        sources: list[DataSource],
        batch_size: int = 64,
        num_workers: int = 8,
        global_size: int = 224,
        local_size: int = 224,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        samples_per_epoch: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, global_size, local_size, num_global, num_local,
            global_scale, local_scale, seed, pin_memory, persistent_workers, eval_size,
        )
        self.sources = list(sources)
        self.samples_per_epoch = samples_per_epoch
        self.corpus: Corpus | None = None
        self.dataset: PretrainDataset | None = None

    @property
    def modalities(self) -> list[str]:
        """Unique modality names in source order; batch ``"modality"`` values index this list."""
        return unique_modalities(self.sources)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the sources and check that at least one image decodes."""
        if self.dataset is not None:
            return
        if not self.sources:
            raise ValueError(
                "PretrainDataModule: `sources` is empty; list at least one DataSource "
                "(data.sources in the config)"
            )
        corpus = Corpus(self.sources)
        corpus.first_readable()
        self.corpus = corpus
        self.dataset = PretrainDataset(corpus, self.transform)

    def _require_setup(self) -> tuple[Corpus, PretrainDataset]:
        if self.dataset is None or self.corpus is None:
            self.setup("fit")
        assert self.corpus is not None and self.dataset is not None
        return self.corpus, self.dataset

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        corpus, dataset = self._require_setup()
        sampler = WeightedSourceSampler(
            corpus.source_ids,
            [s.weight for s in self.sources],
            num_samples=self.samples_per_epoch,
            seed=self.seed,
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"an epoch has {len(sampler)} samples, fewer than batch_size={self.batch_size} "
                "(batches are dropped when incomplete); lower batch_size or raise samples_per_epoch"
            )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=pretrain_collate,
            drop_last=True,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=_init_worker,
            # Its own generator: worker seeds then never consume the global torch RNG.
            generator=torch.Generator().manual_seed(self.seed),
            batches_done=self._batches_trained,
        )

    def _batches_trained(self) -> int:
        """Batches of the current epoch whose training step has finished (Lightning's count;
        checkpoints store it so a resumed run skips them). 0 outside a Trainer."""
        trainer = self.trainer
        if trainer is None:
            return 0
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:  # epoch over (also when limit_train_batches cut it)
            return max(done, len(trainer.train_dataloader))
        return done

    def routing_dataloader(self, batch_size: int | None = None) -> DataLoader[dict[str, Any]]:
        """Every item once, in corpus order, as ``eval_size`` centre crops.

        Batches: ``{"image": uint8 (B, 3, S, S), "modality": (B,), "index": (B,), "path": [str],
        "skipped": [str]}``. Unreadable files are dropped (warned and listed in ``"skipped"``),
        not replaced, so a batch can be smaller than ``batch_size`` or even empty.
        """
        corpus, _ = self._require_setup()
        return DataLoader(
            RoutingDataset(corpus, EvalTransform(self.eval_size)),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=RoutingCollate(self.eval_size),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            worker_init_fn=_init_worker,
        )
