"""Where pre-training images come from: folders, CSV lists and MedMNIST-style ``.npz`` files.

A :class:`DataSource` is a plain, config-friendly description (it appears in YAML as an entry of
``data.sources``). :func:`resolve_source` turns it into a :class:`ResolvedSource`, an indexable
list of items: file paths (decoded lazily) or rows of an in-memory uint8 array.
"""

from __future__ import annotations

import bisect
import csv
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from midol.data.image_io import IMAGE_EXTENSIONS, is_image_file, load_image

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
        if not self.weight > 0:  # also rejects NaN
            raise ValueError(f"{self.describe()}: weight must be > 0, got {self.weight}")
        if self.kind not in ("auto", "folder", "csv", "npz"):
            raise ValueError(f"{self.describe()}: unknown kind {self.kind!r}")

    def describe(self) -> str:
        """Short name used in error messages."""
        return f"data source {self.path!r} (modality {self.modality!r})"

    def resolved_kind(self) -> Literal["folder", "csv", "npz"]:
        """The concrete kind; raises when ``auto`` cannot decide or the path is missing."""
        return resolve_kind(self.path, self.kind, self.describe())


def resolve_kind(path: str, kind: str, name: str) -> Literal["folder", "csv", "npz"]:
    """``kind`` unless it is ``auto``: then npz / csv by suffix, folder for a directory.
    ``name`` starts the error messages (a missing path, an undecidable ``auto``)."""
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{name}: path does not exist")
    if kind != "auto":
        return kind  # type: ignore[return-value]
    if full.lower().endswith(".npz"):
        return "npz"
    if full.lower().endswith(".csv"):
        return "csv"
    if os.path.isdir(full):
        return "folder"
    raise ValueError(f"{name}: kind 'auto' needs a folder, a .csv or a .npz file; set kind explicitly")


class ResolvedSource:
    """The items of one source. Subclasses implement ``load`` and ``describe_item``."""

    def __init__(self, source: DataSource) -> None:
        self.source = source

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 ``H x W x 3``; may raise ``UnreadableImageError``."""
        raise NotImplementedError

    def describe_item(self, i: int) -> str:
        """File path of item ``i``, or ``file.npz#split[row]``."""
        raise NotImplementedError


class FileListSource(ResolvedSource):
    """Items are image files, decoded on access."""

    def __init__(self, source: DataSource, paths: list[str]) -> None:
        super().__init__(source)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        return load_image(self.paths[i])

    def describe_item(self, i: int) -> str:
        return self.paths[i]


class ArraySource(ResolvedSource):
    """Items are rows of uint8 arrays (``N x H x W`` grey or ``N x H x W x 3`` RGB)."""

    def __init__(self, source: DataSource, arrays: list[tuple[str, np.ndarray]]) -> None:
        super().__init__(source)
        self.arrays = arrays
        self._ends = list(np.cumsum([len(a) for _, a in arrays]))

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def _locate(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._ends, i)
        return k, i - (int(self._ends[k - 1]) if k else 0)

    def load(self, i: int) -> np.ndarray:
        k, row = self._locate(i)
        img = self.arrays[k][1][row]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        elif img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img)

    def describe_item(self, i: int) -> str:
        k, row = self._locate(i)
        return f"{self.source.path}#{self.arrays[k][0]}[{row}]"


def resolve_source(source: DataSource) -> ResolvedSource:
    """List the items of ``source``; raises ``FileNotFoundError``/``ValueError`` naming it."""
    kind = source.resolved_kind()
    if kind == "folder":
        return FileListSource(source, _scan_folder(source))
    if kind == "csv":
        return FileListSource(source, _read_csv(source))
    return ArraySource(source, _read_npz(source))


def _scan_folder(source: DataSource) -> list[str]:
    root = os.path.expanduser(source.path)
    if not os.path.isdir(root):
        raise ValueError(f"{source.describe()}: kind 'folder' but the path is not a directory")
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Sorted walk keeps item order (and hence sampling) identical across machines;
        # dot-entries are skipped (macOS "._x.jpg" forks and the like are not images).
        dirnames[:] = (
            sorted(d for d in dirnames if not d.startswith(".")) if source.recursive else []
        )
        paths.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and is_image_file(f)
        )
    if not paths:
        where = "or its sub-folders " if source.recursive else ""
        raise ValueError(
            f"{source.describe()}: no image file found in the folder {where}"
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def _read_csv(source: DataSource) -> list[str]:
    csv_path = os.path.expanduser(source.path)
    base = os.path.expanduser(source.root) if source.root else os.path.dirname(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if source.path_column not in columns:
            raise ValueError(
                f"{source.describe()}: CSV has no column {source.path_column!r} "
                f"(columns: {', '.join(columns) or 'none'}); set path_column"
            )
        cells = [(row.get(source.path_column) or "").strip() for row in reader]
    paths = [os.path.join(base, os.path.expanduser(c)) for c in cells if c]
    if not paths:
        raise ValueError(f"{source.describe()}: CSV column {source.path_column!r} lists no path")
    return paths


def _read_npz(source: DataSource) -> list[tuple[str, np.ndarray]]:
    with np.load(os.path.expanduser(source.path)) as npz:
        available = sorted(k[: -len("_images")] for k in npz.files if k.endswith("_images"))
        arrays: list[tuple[str, np.ndarray]] = []
        for split in source.splits:
            key = f"{split}_images"
            if key not in npz.files:
                raise ValueError(
                    f"{source.describe()}: npz has no array {key!r} "
                    f"(splits present: {', '.join(available) or 'none'})"
                )
            arr = npz[key]
            rgb = arr.ndim == 4 and arr.shape[3] in (1, 3)
            if arr.dtype != np.uint8 or not (arr.ndim == 3 or rgb):
                raise ValueError(
                    f"{source.describe()}: {key!r} must be uint8 N x H x W or N x H x W x 3, "
                    f"got {arr.dtype} {arr.shape}"
                )
            arrays.append((split, arr))
    if not source.splits:
        raise ValueError(f"{source.describe()}: splits is empty")
    if sum(len(a) for _, a in arrays) == 0:
        raise ValueError(f"{source.describe()}: the selected splits hold no image")
    return arrays
