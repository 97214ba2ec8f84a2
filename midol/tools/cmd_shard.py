"""``midol shard``: write image sources into WebDataset shards for streaming pre-training.

    midol shard --source sample_data/xray xray --source sample_data/oct oct --out shards/
    midol shard --from-config configs/pretrain/demo.yaml --out shards/ --shard-size 500
    midol shard --add-offsets shards/   # offsets files for shards written without them

Then train with ``data.class_path: midol.data.shards.ShardedPretrainDataModule`` and
``data.init_args.index: shards/index.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from midol.errors import UsageError

if TYPE_CHECKING:
    from midol.data.sources import DataSource


def _sources_from_config(path: str) -> list[DataSource]:
    """The sources of a ``midol fit`` config (``data.init_args.sources``, a ``data:`` block
    or a top-level ``sources:`` list; ``base:`` presets composed), as ``midol route --data``."""
    from midol.analysis.inputs import sources_from_config

    try:
        return sources_from_config(path)[0]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--from-config {path}: file not found") from err
    except ValueError as err:
        raise UsageError(f"--from-config {path}: {err}".replace(f"{path}: {path}: ", f"{path}: ")) from err


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="midol shard",
        description="Write image folders, CSV lists or .npz files into per-modality WebDataset "
        "tar shards plus an index.json, for midol.data.ShardedPretrainDataModule.",
    )
    parser.add_argument("--source", nargs=2, action="append", default=[],
                        metavar=("PATH", "MODALITY"), help="a folder, .csv or .npz and its modality")
    parser.add_argument("--from-config", default=None,
                        help="take the sources of a `midol fit` config (data.init_args.sources)")
    parser.add_argument("--out", default=None, help="output folder (no index.json in it yet)")
    parser.add_argument("--add-offsets", default=None, metavar="INDEX",
                        help="only write the missing per-sample offsets files of existing shards "
                        "(an index.json or its folder; shards written before midol stored them)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-side", type=int, default=None,
                        help="shrink larger images to this longest side (stored as --encoding)")
    parser.add_argument("--encoding", choices=("png", "jpg"), default="png",
                        help="format of re-encoded images (--max-side, .npz rows): png "
                        "(lossless, default) or jpg (lossy, faster to decode)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of --encoding jpg")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ns = parser.parse_args(argv)
    if ns.add_offsets is not None:
        if ns.out or ns.source or ns.from_config:
            parser.error("--add-offsets works on existing shards: give no --out/--source/--from-config")
        from midol.data.shards.writer import add_offsets

        done = add_offsets(ns.add_offsets)
        print(f"offsets files: {done['written']} written, {done['present']} already there"
              + (f", {done['remote']} remote shard(s) skipped" if done["remote"] else ""))
        return 0
    if ns.out is None:
        parser.error("--out is required (or --add-offsets INDEX)")
    if ns.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {ns.shard_size}")
    if ns.max_side is not None and ns.max_side < 1:
        parser.error(f"--max-side must be >= 1, got {ns.max_side}")
    if not 1 <= ns.quality <= 100:
        parser.error(f"--quality must lie in [1, 100], got {ns.quality}")
    # imported after parsing: `midol shard --help` stays instant
    from midol.data.shards.writer import write_shards
    from midol.data.sources import DataSource

    sources = [DataSource(path, modality) for path, modality in ns.source]
    if ns.from_config:
        sources += _sources_from_config(ns.from_config)
    if not sources:
        parser.error("give at least one --source PATH MODALITY or --from-config CONFIG")
    index = write_shards(sources, ns.out, ns.shard_size, ns.max_side, progress=not ns.no_progress,
                         encoding=ns.encoding, quality=ns.quality)
    for modality in index.modalities:
        print(f"{modality}: {index.num_samples(modality)} images in "
              f"{len(index.shards[modality])} shard(s)")
    if index.skipped:
        print(f"skipped {len(index.skipped)} unreadable image(s), listed in the index")
    print(f"wrote {Path(ns.out) / 'index.json'}")
    return 0
