"""Where pre-training images come from: folders, CSV lists and MedMNIST-style ``.npz`` files.

A :class:`DataSource` is a plain, config-friendly description (it appears in YAML as an entry of
``data.sources``). :func:`resolve_source` turns it into an :class:`~midol.data.readers.ImageList`
(file paths decoded lazily, or rows of in-memory uint8 arrays) with the package's one reader stack.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from midol.data.readers import (
    ImageList,
    check_image_array,
    csv_base,
    image_extensions,
    npz_splits,
    read_csv_rows,
    read_npz_arrays,
    resolve_kind,
    scan_images,
)

SourceKind = Literal["auto", "folder", "csv", "npz"]


@dataclass
class DataSource:
    """One group of unlabelled images of a single modality.

    Attributes:
        path: Folder, ``.csv`` file or ``.npz`` file.
        modality: Modality name (e.g. ``xray``); used for reporting only, never as a training label.
        kind: ``auto`` picks npz for ``*.npz``, csv for ``*.csv``, folder for a directory.
        weight: Relative sampling rate of each image of this source (2.0 = drawn twice as
            often as an image of a weight-1 source; see ``WeightedSourceSampler``); > 0.
        path_column: CSV column holding image paths.
        root: CSV only: base folder of relative paths (default: the CSV's folder).
        splits: NPZ only: which ``{split}_images`` arrays to use, in order.
        recursive: Folder only: also scan sub-folders.
        include: Folder and CSV: keep only images whose path relative to the folder (CSV: as
            listed) matches one of these glob patterns (``*`` matches across ``/``, e.g.
            ``images/*``); default: all.
        exclude: Folder and CSV: drop images matching one of these patterns (e.g. ``*masks/*``
            so a dataset's segmentation masks are not trained on as images).
        bits: Folder and CSV: the bit depth of this source's 16-bit files (e.g. 12 for X-ray and
            CT exports storing 0-4095): mapped from 0 .. 2**bits - 1 onto 0-255; default: the
            full 16-bit range (a file below 4096 is then warned about).
    """

    path: str
    modality: str
    kind: SourceKind = "auto"
    weight: float = 1.0
    path_column: str = "path"
    root: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    recursive: bool = True
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and not 8 <= int(self.bits) <= 16:
            raise ValueError(f"{self.describe()}: bits must be between 8 and 16, got {self.bits!r}")
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):  # rejects NaN, inf and 0
            raise ValueError(
                f"{self.describe()}: weight must be > 0 and finite (a relative sampling rate), "
                f"got {self.weight!r}")
        if self.kind not in ("auto", "folder", "csv", "npz"):
            raise ValueError(f"{self.describe()}: unknown kind {self.kind!r}")

    def describe(self) -> str:
        """Short name used in error messages."""
        return f"data source {self.path!r} (modality {self.modality!r})"

    def resolved_kind(self) -> Literal["folder", "csv", "npz"]:
        """The concrete kind; raises when ``auto`` cannot decide or the path is missing."""
        return resolve_kind(self.path, self.kind, self.describe())


def filter_paths(paths: list[str], source: DataSource, base: str) -> list[str]:
    """``paths`` kept by the source's ``include`` / ``exclude`` globs (matched against the path
    relative to ``base``); an error naming the patterns when nothing is left."""
    if source.include is None and not source.exclude:
        return paths
    if source.kind == "npz" or (source.include is not None and not source.include):
        raise ValueError(f"{source.describe()}: include must name at least one pattern")

    def rel(p: str) -> str:
        return os.path.relpath(p, base).replace(os.sep, "/")

    kept = [p for p in paths
            if (source.include is None or any(fnmatch.fnmatchcase(rel(p), g) for g in source.include))
            and not any(fnmatch.fnmatchcase(rel(p), g) for g in source.exclude)]
    if not kept:
        raise ValueError(f"{source.describe()}: include {source.include} / exclude {source.exclude} "
                         f"leave none of its {len(paths)} images")
    return kept


def source_table(sources: list[DataSource], sizes: list[int]) -> str:
    """The start-up table: per source its modality, kind, images, weight and share of the
    draws (weight x images over the total), then per modality."""
    draws = [s.weight * n for s, n in zip(sources, sizes, strict=True)]
    total = sum(draws) or 1.0
    lines = ["| source | modality | kind | images | weight | share of draws |", "|---|---|---|---:|---:|---:|"]
    for s, n, d in zip(sources, sizes, draws, strict=True):
        lines.append(f"| {s.path} | {s.modality} | {s.resolved_kind()} | {n} | {s.weight:g} | {d / total:.1%} |")
    per: dict[str, list[float]] = {}
    for s, n, d in zip(sources, sizes, draws, strict=True):
        entry: list[float] = per.setdefault(s.modality, [0, 0.0])
        entry[0] += n
        entry[1] += d
    lines.append("| **per modality** | | | | | |")
    for modality, (n, d) in per.items():
        lines.append(f"| | {modality} | | {int(n)} | | {d / total:.1%} |")
    return "\n".join(lines)


def resolve_source(source: DataSource) -> ImageList:
    """List the items of ``source``; raises ``FileNotFoundError``/``ValueError`` naming it."""
    kind = source.resolved_kind()
    name = source.describe()
    if kind == "folder":
        root = os.path.expanduser(source.path)
        if not os.path.isdir(root):
            raise ValueError(f"{name}: kind 'folder' but the path is not a directory")
        paths = scan_images(root, source.recursive, name)
        if not paths:
            where = "or its sub-folders " if source.recursive else ""
            raise ValueError(
                f"{name}: no image file found in the folder {where}(extensions: {image_extensions()})"
            )
        paths = filter_paths(paths, source, root)
        return ImageList(source.path, paths=paths, bits=source.bits)
    if kind == "csv":
        rows = read_csv_rows(source.path, [source.path_column], name=name)
        cells = [(row.get(source.path_column) or "").strip() for row in rows]
        base = csv_base(source.path, source.root)
        paths = [os.path.join(base, os.path.expanduser(c)) for c in cells if c]
        if not paths:
            raise ValueError(f"{name}: CSV column {source.path_column!r} lists no path")
        paths = filter_paths(paths, source, base)
        return ImageList(source.path, paths=paths, bits=source.bits)
    if not source.splits:
        raise ValueError(f"{name}: splits is empty")
    keys = [f"{split}_images" for split in source.splits]
    try:
        found = read_npz_arrays(source.path, keys, name)
    except ValueError as err:
        if "has no array" not in str(err):
            raise
        raise ValueError(
            f"{name}: npz has no array {', '.join(map(repr, keys))} for splits {source.splits} "
            f"(splits present: {', '.join(npz_splits(source.path)) or 'none'})"
        ) from err
    for key, arr in found.items():
        check_image_array(name, key, arr)
    arrays = [(split, found[f"{split}_images"]) for split in source.splits]
    if sum(len(a) for _, a in arrays) == 0:
        raise ValueError(f"{name}: the selected splits hold no image")
    return ImageList(source.path, arrays=arrays)
