"""Writing image sources into per-modality WebDataset shards (``midol shard``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from midol.data.image_io import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    UnreadableImageWarning,
    decode_image_bytes,
)
from midol.data.medical_io import ReadOptions
from midol.data.readers import ImageList
from midol.data.shards.index import (
    INDEX_NAME,
    ShardIndex,
    is_local,
    offsets_path,
    save_offsets,
    scan_sample_offsets,
)
from midol.data.sources import DataSource, resolve_source

ENCODINGS = ("png", "jpg")


def _encode(image: np.ndarray, encoding: str = "png", quality: int = 95) -> bytes:
    """``image`` (RGB or gray uint8) as PNG (lossless) or JPEG of ``quality``."""
    bgr = np.ascontiguousarray(image[..., ::-1] if image.ndim == 3 else image)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if encoding == "jpg" else []
    ok, buf = cv2.imencode(f".{encoding}", bgr, params)
    if not ok:
        raise RuntimeError(f"{encoding.upper()} encoding failed")
    return buf.tobytes()


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _encoded_item(source: Any, i: int, max_side: int | None, encoding: str = "png",
                  quality: int = 95) -> tuple[str, bytes]:
    """(extension, bytes) of item ``i``; checks that it decodes."""
    path = source.path(i) if isinstance(source, ImageList) else None
    # the file's own bytes only when reading it needs nothing of the source (bits: 12, minmax):
    # a shard reader decodes bytes with the default rules
    if path is not None and max_side is None and source.options == ReadOptions():
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
    return encoding, _encode(image, encoding, quality)


def _close(writer: Any, starts: list[int], path: Path) -> None:
    """Close a shard and write its sample offsets beside it (``<shard>.offsets.npy``)."""
    end = writer.tarstream.offset  # the end of the last sample, before the end-of-archive blocks
    writer.close()
    save_offsets(path, np.asarray(starts + [end], dtype=np.int64))


def write_shards(
    sources: Sequence[DataSource],
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    max_side: int | None = None,
    progress: bool = True,
    encoding: str = "png",
    quality: int = 95,
) -> ShardIndex:
    """Write every readable item of ``sources`` into per-modality WebDataset shards.

    Args:
        sources: as ``data.sources`` of a pre-training config; their ``weight`` is not stored
            (weights are chosen when reading, per modality).
        out_dir: created if needed; must not hold an ``index.json`` already.
        shard_size: samples per shard. With at least (GPUs x workers) shards per modality
            each data-loading worker reads whole shards of its own (sequential reads); with
            fewer, it seeks to its own samples in every shard (see ``ShardStream``).
        max_side: shrink larger images to this longest side (area interpolation, stored in
            ``encoding``): decoding then costs less at every epoch. None keeps the files as
            they are.
        progress: show a progress bar.
        encoding: how re-encoded images (``max_side``, ``.npz`` rows) are stored: ``png``
            (lossless) or ``jpg`` (JPEG of ``quality``: lossy, and about 4x faster to decode
            than PNG at 256 px; experiments/results/decode_rates_2026-12-08.md).
        quality: JPEG quality (1-100) of ``encoding="jpg"``.

    Unreadable items are skipped with a warning and listed in the index (``skipped``). Beside
    each shard, ``<shard>.offsets.npy`` holds the byte offset of every sample (and the end of
    the last): a data-loading worker then reads only its own samples of a shard.
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 8:
        raise ValueError(f"max_side must be >= 8 pixels, got {max_side}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality}")
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
    offsets: dict[str, list[int]] = {}
    try:
        for modality, source in resolved:
            (out / modality).mkdir(parents=True, exist_ok=True)
            shards.setdefault(modality, [])
            counts.setdefault(modality, [])
            for i in range(len(source)):
                bar.update(1)
                try:
                    ext, data = _encoded_item(source, i, max_side, encoding, quality)
                except UnreadableImageError as err:
                    warnings.warn(f"skipping unreadable image {err.path}: {err.reason}",
                                  UnreadableImageWarning, stacklevel=2)
                    skipped.append(f"{err.path}: {err.reason}")
                    continue
                if not counts[modality] or counts[modality][-1] >= shard_size:
                    if modality in writers:
                        _close(writers.pop(modality), offsets.pop(modality),
                               out / shards[modality][-1])
                    name = f"{modality}/{modality}-{len(shards[modality]):06d}.tar"
                    writers[modality] = wds.TarWriter(str(out / name))
                    offsets[modality] = []
                    shards[modality].append(name)
                    counts[modality].append(0)
                key = f"{sum(counts[modality]):09d}"
                origin = source.describe(i)
                # where this sample's first tar header starts: a worker seeks there to read it
                offsets[modality].append(writers[modality].tarstream.offset)
                writers[modality].write(
                    {"__key__": key, ext: data, "json": {"modality": modality, "origin": origin}}
                )
                counts[modality][-1] += 1
        for modality in list(writers):
            _close(writers.pop(modality), offsets.pop(modality), out / shards[modality][-1])
    finally:
        for writer in writers.values():  # an error left these open: no offsets for them
            writer.close()
        bar.close()
    empty = [m for m in shards if not counts[m]]
    if empty:
        raise ValueError(f"no readable image for modality {', '.join(empty)}")
    index = ShardIndex(out, shards, counts, skipped)
    index.save(out / INDEX_NAME)
    return index


def add_offsets(index_path: str | os.PathLike[str]) -> dict[str, int]:
    """Write the missing ``<shard>.offsets.npy`` of shards written before midol stored them
    (one scan of each shard's tar headers), so that workers stop scanning them.

    Returns the numbers of shards ``written``, ``present`` (left as they were) and ``remote``
    (``pipe:``/URL shards, which cannot be sought into).
    """
    index = ShardIndex.load(index_path)
    done = {"written": 0, "present": 0, "remote": 0}
    for modality in index.modalities:
        for i, shard in enumerate(index.shards[modality]):
            url = index.url(shard)
            if not is_local(url):
                done["remote"] += 1
            elif offsets_path(url).is_file():
                index.sample_offsets(modality, i)  # checks it against the index
                done["present"] += 1
            else:
                offsets = scan_sample_offsets(url)
                if len(offsets) != index.counts[modality][i] + 1:
                    raise ValueError(f"{url}: {len(offsets) - 1} samples, the index says "
                                     f"{index.counts[modality][i]}; write the shards again")
                save_offsets(url, offsets)
                done["written"] += 1
    return done
