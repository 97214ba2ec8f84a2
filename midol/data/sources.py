"""Where pre-training images come from: folders, CSV lists and MedMNIST-style ``.npz`` files.

A :class:`DataSource` is a plain, config-friendly description (it appears in YAML as an entry of
``data.sources``). :func:`resolve_source` turns it into an :class:`~midol.data.readers.ImageList`
(file paths decoded lazily, or rows of in-memory uint8 arrays) with the package's one reader stack.
"""

from __future__ import annotations

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
    """

    path: str
    modality: str
    kind: SourceKind = "auto"
    weight: float = 1.0
    path_column: str = "path"
    root: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    recursive: bool = True

    def __post_init__(self) -> None:
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
        return ImageList(source.path, paths=paths)
    if kind == "csv":
        rows = read_csv_rows(source.path, [source.path_column], name=name)
        cells = [(row.get(source.path_column) or "").strip() for row in rows]
        base = csv_base(source.path, source.root)
        paths = [os.path.join(base, os.path.expanduser(c)) for c in cells if c]
        if not paths:
            raise ValueError(f"{name}: CSV column {source.path_column!r} lists no path")
        return ImageList(source.path, paths=paths)
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
