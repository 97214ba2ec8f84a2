"""Streaming pre-training corpus for large collections: WebDataset tar shards per modality.

Write once (``midol shard``, or :func:`write_shards`)::

    midol shard --source /data/fundus fundus --source /data/cxr.csv xray --out shards/

then train from ``shards/index.json`` with :class:`ShardedPretrainDataModule`. Layout::

    shards/index.json                         # format, modalities, shard files, sample counts
    shards/<modality>/<modality>-000000.tar   # WebDataset tars: <key>.<ext> + <key>.json

A sample's image is the source file's own bytes when its format is readable (no re-encoding),
else (arrays, ``max_side`` resizing) a PNG; its ``.json`` holds ``{"modality", "origin"}``.
Shard URLs are read with ``webdataset.gopen``: local paths, and also ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/x.tar -``) or HTTP(S) URLs written into the index by hand.

Reading is sequential (tar streams), so a collection far larger than memory or local disk
trains at the speed of the decoders. Each modality is its own endless stream; every sample
draws its modality with the configured weights (share of the draws), then takes the next image
of that modality's stream (shard order reshuffled every pass, plus a shuffle buffer).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from midol.data.image_io import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    UnreadableImageWarning,
    _to_rgb_array,
)
from midol.data.multicrop_module import MultiCropDataModule
from midol.data.pretrain import RoutingCollate, pretrain_collate
from midol.data.sources import DataSource, FileListSource, resolve_source
from midol.data.transforms import EvalTransform, MultiCropTransform
from midol.utils.dist import rank, world_size

INDEX_FORMAT = "midol-shards/1"
INDEX_NAME = "index.json"


# ------------------------------------------------------------------------------ the index
@dataclass
class ShardIndex:
    """What ``index.json`` holds: per modality, its shard URLs and their sample counts."""

    root: Path
    shards: dict[str, list[str]]
    counts: dict[str, list[int]]
    skipped: list[str]

    @property
    def modalities(self) -> list[str]:
        return list(self.shards)

    def num_samples(self, modality: str | None = None) -> int:
        mods = [modality] if modality is not None else self.modalities
        return sum(sum(self.counts[m]) for m in mods)

    def url(self, shard: str) -> str:
        """Relative shard paths are relative to the index's folder; URLs pass through."""
        if "://" in shard or shard.startswith("pipe:") or os.path.isabs(shard):
            return shard
        return str(self.root / shard)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardIndex:
        """Read ``path`` (an ``index.json`` or the folder holding one)."""
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir():
            p = p / INDEX_NAME
        if not p.is_file():
            raise FileNotFoundError(
                f"shard index {p} not found: write shards first (midol shard --help)"
            )
        data = json.loads(p.read_text())
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{p}: format {data.get('format')!r}, expected {INDEX_FORMAT!r}")
        shards = {m: list(v["shards"]) for m, v in data["modalities"].items()}
        counts = {m: [int(c) for c in v["counts"]] for m, v in data["modalities"].items()}
        for m in shards:
            if len(shards[m]) != len(counts[m]) or not shards[m] or min(counts[m]) < 1:
                raise ValueError(f"{p}: modality {m!r} lists no shard or an empty shard")
        if not shards:
            raise ValueError(f"{p}: no modality")
        return cls(p.parent, shards, counts, list(data.get("skipped", [])))

    def save(self, path: Path) -> None:
        data = {
            "format": INDEX_FORMAT,
            "modalities": {
                m: {"shards": self.shards[m], "counts": self.counts[m]} for m in self.shards
            },
            "skipped": self.skipped,
        }
        path.write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------ writing
def decode_image_bytes(data: bytes, origin: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 ``H x W x 3``, with :func:`~midol.data.load_image`'s
    conversion rules; raises ``UnreadableImageError``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = _to_rgb_array(im)
    except Exception as err:  # Pillow raises many unrelated types for bad data
        raise UnreadableImageError(origin, f"{type(err).__name__}: {err}") from err
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise UnreadableImageError(origin, f"unexpected decoded shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _encoded_item(source: Any, i: int, max_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of item ``i``; checks that it decodes."""
    if isinstance(source, FileListSource) and max_side is None:
        path = source.paths[i]
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if path.lower().endswith(IMAGE_EXTENSIONS):
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err
            decode_image_bytes(data, path)
            return ("jpg" if ext == "jpeg" else "tiff" if ext == "tif" else ext), data
    image = source.load(i)
    if max_side is not None:
        image = _shrink(image, max_side)
    return "png", _png(image)


def write_shards(
    sources: Sequence[DataSource],
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    max_side: int | None = None,
    progress: bool = True,
) -> ShardIndex:
    """Write every readable item of ``sources`` into per-modality WebDataset shards.

    Args:
        sources: as ``data.sources`` of a pre-training config; their ``weight`` is not stored
            (weights are chosen when reading, per modality).
        out_dir: created if needed; must not hold an ``index.json`` already.
        shard_size: samples per shard. Write at least (GPUs x workers) shards per modality:
            each data-loading worker then reads its own shards.
        max_side: shrink larger images to this longest side (area interpolation, stored as
            PNG): decoding then costs less at every epoch. None keeps the files as they are.
        progress: show a progress bar.

    Unreadable items are skipped with a warning and listed in the index (``skipped``).
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 8:
        raise ValueError(f"max_side must be >= 8 pixels, got {max_side}")
    if not sources:
        raise ValueError("write_shards needs at least one DataSource")
    out = Path(os.path.expanduser(str(out_dir)))
    if (out / INDEX_NAME).exists():
        raise FileExistsError(f"{out / INDEX_NAME} exists: choose an empty output folder")
    resolved = [(s.modality, resolve_source(s)) for s in sources]
    for modality, _ in resolved:
        if not modality or "/" in modality or modality.startswith("."):
            raise ValueError(f"modality name {modality!r} cannot name a folder")
    shards: dict[str, list[str]] = {}
    counts: dict[str, list[int]] = {}
    skipped: list[str] = []
    total = sum(len(r) for _, r in resolved)
    bar = tqdm(total=total, desc="writing shards", unit="img", disable=not progress)
    writers: dict[str, Any] = {}
    try:
        for modality, source in resolved:
            (out / modality).mkdir(parents=True, exist_ok=True)
            shards.setdefault(modality, [])
            counts.setdefault(modality, [])
            for i in range(len(source)):
                bar.update(1)
                try:
                    ext, data = _encoded_item(source, i, max_side)
                except UnreadableImageError as err:
                    warnings.warn(f"skipping unreadable image {err.path}: {err.reason}",
                                  UnreadableImageWarning, stacklevel=2)
                    skipped.append(f"{err.path}: {err.reason}")
                    continue
                if not counts[modality] or counts[modality][-1] >= shard_size:
                    if modality in writers:
                        writers[modality].close()
                    name = f"{modality}/{modality}-{len(shards[modality]):06d}.tar"
                    writers[modality] = wds.TarWriter(str(out / name))
                    shards[modality].append(name)
                    counts[modality].append(0)
                key = f"{sum(counts[modality]):09d}"
                origin = source.describe_item(i)
                writers[modality].write(
                    {"__key__": key, ext: data, "json": {"modality": modality, "origin": origin}}
                )
                counts[modality][-1] += 1
    finally:
        for writer in writers.values():
            writer.close()
        bar.close()
    empty = [m for m in shards if not counts[m]]
    if empty:
        raise ValueError(f"no readable image for modality {', '.join(empty)}")
    index = ShardIndex(out, shards, counts, skipped)
    index.save(out / INDEX_NAME)
    return index


# ------------------------------------------------------------------------------ reading
def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard, in order: ``{"__key__", "<ext>": bytes, "json": bytes}``."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}])


def _image_of(sample: dict[str, Any]) -> tuple[bytes, str]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    origin = str(meta.get("origin", sample.get("__key__", "?")))
    for key, value in sample.items():
        if not key.startswith("__") and key != "json" and isinstance(value, bytes):
            return value, origin
    raise UnreadableImageError(origin, "shard sample holds no image")


def _seed(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


class ShardStream(IterableDataset):
    """Multi-crop views from shards, ``batches_per_epoch`` batches per rank and epoch.

    Deterministic given (seed, epoch, rank, worker layout): the data-loading slot
    ``rank x workers + worker`` reads its own shards of each modality (every slot reads every
    shard of a modality with fewer shards than slots, keeping one sample in ``slots``). Sample
    ``k`` of the epoch draws its modality and its augmentation from (seed, epoch, k) alone.
    ``skip`` leading batches are read but not decoded (resuming mid-epoch).
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: MultiCropTransform,
        weights: dict[str, float],
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        shuffle_buffer: int = 200,
        max_tries: int = 64,
    ) -> None:
        self.index = index
        self.transform = transform
        self.modalities = index.modalities
        w = np.array([weights[m] for m in self.modalities], dtype=np.float64)
        self.probs = w / w.sum()
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_tries = max_tries
        self.rank, self.world = 0, 1
        self.epoch, self.skip = 0, 0
        self._local_iters = 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _modality_stream(self, m: int, epoch: int, slot: int, slots: int) -> Iterator[bytes | Any]:
        name = self.modalities[m]
        urls = [self.index.url(s) for s in self.index.shards[name]]
        counts = self.index.counts[name]
        # (url, first sample number of the shard in its modality, keep every slots-th or None)
        if len(urls) >= slots:
            units = [(u, 0, None) for u in urls[slot::slots]]
        else:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
            # Fewer samples than slots: every slot reads everything (duplicates across slots).
            keep = (slot, slots) if sum(counts) >= slots else None
            units = [(u, int(first), keep) for u, first in zip(urls, starts)]
        rng = _seed(self.seed, epoch, slot, m)
        buffer: list[Any] = []
        while True:  # endless: every pass reshuffles the shard order
            for u in rng.permutation(len(units)):
                url, first, keep = units[int(u)]
                for k, sample in enumerate(_read_shard(url)):
                    if keep is not None and (first + k) % keep[1] != keep[0]:
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    if self.shuffle_buffer:
                        j = int(rng.integers(len(buffer)))
                        sample, buffer[j] = buffer[j], sample
                    yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Persistent workers keep their copy of this object: count the epochs here.
        epoch = self.epoch + self._local_iters
        skip = self.skip if self._local_iters == 0 else 0
        self._local_iters += 1
        # Batch b of the epoch comes from stream b % workers (DataLoader takes batches from the
        # workers in turn). After skipping, worker w serves the batches skip + w + k x workers,
        # so it runs the stream those batches had in the uninterrupted run.
        stream = (worker + skip) % workers
        slot, slots = self.rank * workers + stream, self.world * workers
        streams = [self._modality_stream(m, epoch, slot, slots) for m in range(len(self.modalities))]
        for b in range(stream, self.batches_per_epoch, workers):
            for j in range(self.batch_size):
                position = (b * self.batch_size + j) * self.world + self.rank
                m = int(_seed(self.seed, epoch, position).choice(len(self.probs), p=self.probs))
                if b < skip:
                    next(streams[m])  # keep the stream where the saved run had it, no decoding
                    continue
                yield self._item(streams[m], m, epoch, position)

    def _item(self, stream: Iterator[Any], m: int, epoch: int, position: int) -> dict[str, Any]:
        skipped: list[str] = []
        for _ in range(self.max_tries):
            sample = next(stream)
            try:
                data, origin = _image_of(sample)
                image = decode_image_bytes(data, origin)
            except UnreadableImageError as err:
                msg = f"{err.path}: {err.reason}"
                warnings.warn(f"skipping unreadable image {msg}", UnreadableImageWarning,
                              stacklevel=2)
                skipped.append(msg)
                continue
            reseed = getattr(self.transform, "reseed", None)
            if callable(reseed):
                reseed((epoch, position))
            return {"views": self.transform(image), "modality": m, "index": position,
                    "skipped": skipped}
        raise RuntimeError(f"{self.max_tries} unreadable images in a row: " + "; ".join(skipped[:5]))


class ShardLoader(DataLoader):
    """DataLoader over a :class:`ShardStream` that resumes mid-epoch (Lightning stores
    :meth:`state_dict` in checkpoints and hands it back before the first resumed batch)."""

    def __init__(self, dataset: ShardStream, *args: Any,
                 batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.batches_done = batches_done
        self._next_epoch, self._skip, self._epoch = 0, 0, 0
        self._layout = (0, 0, 0)

    def __iter__(self):  # type: ignore[override]
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        ds.rank, ds.world = rank(), world_size()
        ds.epoch, ds.skip, ds._local_iters = self._next_epoch, self._skip, 0
        self._epoch, self._next_epoch, self._skip = self._next_epoch, self._next_epoch + 1, 0
        self._layout = (ds.world, self.num_workers, ds.batch_size)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        world, workers, batch = self._layout
        return {"epoch": self._epoch, "batches_done": int(self.batches_done()),
                "world_size": world, "num_workers": workers, "batch_size": batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        now = (world_size(), self.num_workers, ds.batch_size)
        saved = (state.get("world_size"), state.get("num_workers"), state.get("batch_size"))
        if saved != now:
            warnings.warn(
                f"resuming shards with (world size, workers, batch size) = {now}, saved with "
                f"{saved}: each worker's stream differs, so the data continues, not exactly",
                stacklevel=2,
            )
        if done >= ds.batches_per_epoch:
            epoch, done = epoch + 1, 0
        self._next_epoch, self._skip = epoch, done


class _EvalStream(IterableDataset):
    """Every sample once (shards dealt out to workers), centre-cropped, for routing tables."""

    def __init__(self, index: ShardIndex, size: int) -> None:
        self.index, self.transform = index, EvalTransform(size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        names = self.index.modalities
        offsets = np.cumsum([0] + [self.index.num_samples(n) for n in names])
        jobs = [(m, s) for m, name in enumerate(names) for s in range(len(self.index.shards[name]))]
        for m, s in jobs[worker::workers]:
            name = names[m]
            first = int(offsets[m]) + sum(self.index.counts[name][:s])
            for k, sample in enumerate(_read_shard(self.index.url(self.index.shards[name][s]))):
                try:
                    data, origin = _image_of(sample)
                    image = decode_image_bytes(data, origin)
                except UnreadableImageError as err:
                    yield {"skipped": f"{err.path}: {err.reason}"}
                    continue
                yield {"image": self.transform(image), "modality": m, "index": first + k,
                       "path": origin}


class ShardedPretrainDataModule(MultiCropDataModule):
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
        global_size / local_size / num_global / num_local / global_scale / local_scale:
            the multi-crop views (as ``PretrainDataModule``).
        samples_per_epoch: draws per epoch over all devices (default: the corpus size).
        shuffle_buffer: samples held per modality and worker for shuffling (memory: buffer x
            modalities x workers x mean encoded image size).
        seed: seed of the streams, modality draws and augmentations.
        pin_memory: pin batches in page-locked memory (only used when CUDA is available).
        persistent_workers: keep workers alive between epochs.
        eval_size: image side for ``routing_dataloader`` (default: global_size).
    """

    def __init__(
        self,
        index: str,
        modality_weights: dict[str, float] | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        global_size: int = 224,
        local_size: int = 224,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 200,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, global_size, local_size, num_global, num_local,
            global_scale, local_scale, seed, pin_memory, persistent_workers, eval_size,
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
        return ShardLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=pretrain_collate,
            drop_last=True,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=_no_cv2_threads,
            batches_done=self._batches_trained,
        )

    def _batches_trained(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def routing_dataloader(self, batch_size: int | None = None) -> DataLoader[dict[str, Any]]:
        """Every sample once, as ``eval_size`` centre crops (batches as
        :meth:`PretrainDataModule.routing_dataloader`; ``index`` numbers the samples in index
        order, modality after modality; ``path`` is the origin recorded at writing)."""
        return DataLoader(
            _EvalStream(self.shard_index, self.eval_size),
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
            collate_fn=RoutingCollate(self.eval_size),
            worker_init_fn=_no_cv2_threads,
        )


def _no_cv2_threads(worker_id: int) -> None:
    cv2.setNumThreads(0)  # the workers are the parallelism
