"""The shard index (``index.json``): per modality, its shard files and their sample counts;
beside each shard, the byte offset of every sample (``<shard>.offsets.npy``)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midol.io.atomic import atomic_write_bytes, atomic_write_text

INDEX_FORMAT = "midol-shards/1"
INDEX_NAME = "index.json"
OFFSETS_SUFFIX = ".offsets.npy"

# webdataset's sample key of a member name (``webdataset.tariterators.base_plus_ext``):
# everything before the first dot of the file name.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member name as webdataset groups it; None: no key."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else None


def is_local(shard_url: str) -> bool:
    """A plain file path (seekable), not a ``pipe:`` command or a URL."""
    return "://" not in shard_url and not shard_url.startswith("pipe:")


def offsets_path(shard_url: str) -> Path:
    return Path(shard_url + OFFSETS_SUFFIX)


def scan_sample_offsets(path: str | os.PathLike[str]) -> np.ndarray:
    """Byte offsets of the samples of an uncompressed tar shard, read from its member headers
    only (data is skipped by seeking): entry ``k`` is where sample ``k``'s first header starts
    (extended headers included), the last entry is where the last sample's data ends."""
    starts: list[int] = []
    end, key = 0, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                parts = member_key(info.name)
                if parts is None:
                    continue
                if parts[0] != key:
                    starts.append(info.offset)
                    key = parts[0]
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                tar.members = []  # type: ignore[attr-defined]  # do not keep every header (as webdataset)
    except tarfile.ReadError as err:
        raise ValueError(f"{path}: not an uncompressed tar shard ({err})") from err
    return np.asarray(starts + [end], dtype=np.int64)


def save_offsets(shard_path: str | os.PathLike[str], offsets: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    atomic_write_bytes(offsets_path(str(shard_path)), buf.getvalue())


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

    def sample_offsets(self, modality: str, i: int, scan: bool = True) -> np.ndarray | None:
        """Byte offsets of shard ``i``'s samples (``count + 1`` entries), from the file
        ``midol shard`` wrote beside it; without that file (shards written before it existed)
        the tar headers are scanned when ``scan``. None for a shard that is not a local file."""
        url = self.url(self.shards[modality][i])
        if not is_local(url):
            return None
        side = offsets_path(url)
        if side.is_file():
            offsets = np.load(side, allow_pickle=False)
        elif scan:
            offsets = scan_sample_offsets(url)
        else:
            return None
        n = self.counts[modality][i]
        if offsets.ndim != 1 or len(offsets) != n + 1 or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{url}: {len(offsets) - 1} sample offsets for {n} samples in the "
                             "index: the shard changed after indexing; write the shards again "
                             "(midol shard)")
        return offsets

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
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
