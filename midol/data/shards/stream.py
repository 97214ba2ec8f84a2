"""Reading shards: an endless stream per modality, mixed by weight, resumable mid-epoch."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midol.data.image_io import UnreadableImageError, UnreadableImageWarning, decode_image_bytes
from midol.data.shards.index import OFFSETS_SUFFIX, ShardIndex, is_local, member_key
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.eval import EvalTransform
from midol.utils.dist import rank, world_size


def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard, in order: ``{"__key__", "<ext>": bytes, "json": bytes}``."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}])


def _open_local(path: str) -> BinaryIO:
    """Opens a local shard for seeking (a seam: tests count the bytes read through it)."""
    return open(path, "rb")


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    if field[:1] and field[0] & 0x80:  # base-256 (GNU): sizes beyond 8 GiB, no image is that big
        raise ValueError("a tar member larger than 8 GiB")
    return int(text, 8) if text else 0


def _tar_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in ``data``, consecutive tar members (ustar, with
    pax or GNU long-name records). A plain-Python reader: ``tarfile`` costs ~0.3 ms per
    sample of a webdataset shard (every member has a pax header), this a few microseconds."""
    pos, long_name = 0, None
    view = memoryview(data)
    while pos + _BLOCK <= len(data):
        header = data[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive blocks
            break
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field as spaces
            raise ValueError(f"bad tar header checksum at byte {pos}")
        size, kind = _octal(header[124:136]), header[156:157]
        body = pos + _BLOCK
        pos = body + -(-size // _BLOCK) * _BLOCK
        if kind == b"x":  # pax records "<len> <key>=<value>\n": only the path matters here
            for record in bytes(view[body:body + size]).split(b"\n"):
                key, _, value = record.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = value
        elif kind == b"L":  # GNU long name
            long_name = bytes(view[body:body + size]).rstrip(b"\0")
        elif kind in _REGULAR:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            full = long_name or (prefix + b"/" + name if prefix else name)
            yield full.decode("utf-8", "surrogateescape"), bytes(view[body:body + size])
            long_name = None
        elif kind != b"g":  # directories, links: not samples
            long_name = None


def _sample_from_bytes(data: bytes, url: str, k: int) -> dict[str, Any]:
    """The sample whose tar members are exactly ``data`` (one sample's byte range), as
    webdataset's ``tarfile_samples`` gives it: ``{"__key__", "__url__", "<ext>": bytes}``."""
    sample: dict[str, Any] = {}
    try:
        for name, content in _tar_files(data):
            parts = member_key(name)
            if parts is None:
                continue
            if sample and parts[0] != sample["__key__"]:
                raise ValueError(f"two samples ({sample['__key__']}, {parts[0]})")
            sample.setdefault("__key__", parts[0])
            sample[parts[1].lower()] = content
    except ValueError as err:
        raise ValueError(f"{url}: sample {k} is not where its offsets file says ({err}); "
                         "write the shards again (midol shard)") from err
    if not sample:
        raise ValueError(f"{url}: sample {k} holds no file; write the shards again (midol shard)")
    sample["__url__"] = url
    return sample


def _read_samples(url: str, offsets: np.ndarray, picks: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Samples ``picks`` (ascending) of a local shard, each read alone from its byte range."""
    with _open_local(url) as f:
        for k in picks:
            start, stop = int(offsets[k]), int(offsets[k + 1])
            f.seek(start)
            yield _sample_from_bytes(f.read(stop - start), url, k)


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
    ``rank x workers + worker`` reads its own shards of each modality. A modality with fewer
    shards than slots is split by sample: slot ``s`` of ``S`` takes the samples ``k`` with
    ``k % S == s`` (numbered across the modality's shards) and reads only their bytes, seeking
    to each through the shard's offsets (``<shard>.offsets.npy``; scanned from the tar
    headers once per worker when absent). A shard that cannot be sought (a ``pipe:`` or HTTP
    URL, a compressed tar) is read in full by every slot, which keeps its own samples, with a
    warning. Sample ``k`` of the epoch draws its modality and its augmentation from
    (seed, epoch, k) alone. ``skip`` leading batches are read but not decoded (resuming).
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: ViewTransform,
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
        self._offset_cache: dict[tuple[str, int, bool], np.ndarray | None] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _modality_stream(self, m: int, epoch: int, slot: int, slots: int) -> Iterator[bytes | Any]:
        name = self.modalities[m]
        urls = [self.index.url(s) for s in self.index.shards[name]]
        counts = self.index.counts[name]
        # (shard number, the samples this slot keeps or None for the whole shard)
        units: list[tuple[int, list[int] | None]]
        if len(urls) >= slots:
            units = [(i, None) for i in range(slot, len(urls), slots)]
        else:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
            # Fewer samples than slots: every slot reads everything (duplicates across slots).
            units = [(i, list(range((slot - int(first)) % slots, n, slots))
                      if sum(counts) >= slots else list(range(n)))
                     for i, (first, n) in enumerate(zip(starts, counts))]
        rng = _seed(self.seed, epoch, slot, m)
        buffer: list[Any] = []
        while True:  # endless: every pass reshuffles the shard order
            for u in rng.permutation(len(units)):
                i, picks = units[int(u)]
                url = urls[i]
                # whole shards are read through their offsets file too when there is one
                # (midol's tar reader is faster than tarfile's), never scanned for it
                offsets = self._offsets(name, i, scan=picks is not None)
                if offsets is not None:
                    samples: Iterator[dict[str, Any]] = _read_samples(
                        url, offsets, range(counts[i]) if picks is None else picks)
                elif picks is None:
                    samples = _read_shard(url)
                else:  # not seekable: read it all, keep this slot's samples
                    keep = set(picks)
                    samples = (x for k, x in enumerate(_read_shard(url)) if k in keep)
                for sample in samples:
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    if self.shuffle_buffer:
                        j = int(rng.integers(len(buffer)))
                        sample, buffer[j] = buffer[j], sample
                    yield sample

    def _offsets(self, modality: str, i: int, scan: bool) -> np.ndarray | None:
        """Shard ``i``'s sample offsets, loaded once per worker process; without an offsets
        file, scanned from the tar headers when ``scan`` (with a warning), else None."""
        cache = self._offset_cache
        if (modality, i, scan) not in cache:
            url = self.index.url(self.index.shards[modality][i])
            offsets = self.index.sample_offsets(modality, i, scan=False)
            if offsets is None and scan and is_local(url):
                warnings.warn(f"{url} has no {OFFSETS_SUFFIX} file (shards written by an older "
                              "midol shard): scanning its tar headers in every worker; "
                              "`midol shard --add-offsets INDEX` writes them once", stacklevel=2)
                try:
                    offsets = self.index.sample_offsets(modality, i, scan=True)
                except ValueError as err:  # e.g. a compressed tar: no seeking into it
                    warnings.warn(f"{err}: every worker reads it in full", stacklevel=2)
            elif offsets is None and scan:
                warnings.warn(f"{url} is not a local file: every data-loading worker reads it in "
                              "full and keeps its own samples; write at least GPUs x workers "
                              f"shards of {modality!r} to avoid that", stacklevel=2)
            cache[(modality, i, scan)] = offsets
        return cache[(modality, i, scan)]

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
            self.transform.reseed((epoch, position))
            return {"views": self.transform(image), "modality": m, "index": position,
                    "skipped": skipped}
        from midol.errors import UnreadableStreakError

        raise UnreadableStreakError(f"{self.max_tries} unreadable images in a row in the shards, "
                                    "e.g. " + "; ".join(skipped[:5]))


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


class EvalStream(IterableDataset):
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
            url = self.index.url(self.index.shards[name][s])
            where = self.index.sample_offsets(name, s, scan=False)
            samples = (_read_samples(url, where, range(self.index.counts[name][s]))
                       if where is not None else _read_shard(url))
            for k, sample in enumerate(samples):
                try:
                    data, origin = _image_of(sample)
                    image = decode_image_bytes(data, origin)
                except UnreadableImageError as err:
                    yield {"skipped": f"{err.path}: {err.reason}"}
                    continue
                yield {"image": self.transform(image), "modality": m, "index": first + k,
                       "path": origin}
