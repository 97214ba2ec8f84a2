"""The shard index (``index.json``): per modality, its shard files and their sample counts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from midol.io.atomic import atomic_write_text

INDEX_FORMAT = "midol-shards/1"
INDEX_NAME = "index.json"


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
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
