"""The one reader stack of midol: image folders, CSV manifests and MedMNIST-style ``.npz`` files.

Pre-training sources, labelled classification and segmentation splits and (next) patient
manifests all list their images through these functions, and load them through
:class:`ImageList`, so every loader decodes, converts and names images the same way.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from midol.data.image_io import as_rgb, image_formats, is_image_file, load_image
from midol.data.medical_io import ReadOptions, is_dicom_file
from midol.errors import InputFileError

Kind = Literal["folder", "csv", "npz"]


class ImageList:
    """The images of one source or split: file paths decoded on access, or rows of uint8
    ``N x H x W [x C]`` arrays (one per npz split), in a fixed order.

    A file may be listed once per slice (``frames``: the slice of a NIfTI volume or the frame
    of a multi-frame DICOM, -1 for the file's default one) and with a group key (``groups``:
    its series or patient; see ``DataSource.group_by``). ``describe(i)`` names item ``i`` in
    warnings and errors: its path (``path#slice=k`` for a slice), or ``file.npz#split[row]``.
    """

    def __init__(
        self,
        origin: str,
        paths: Sequence[str] | None = None,
        arrays: Sequence[tuple[str, np.ndarray]] | None = None,
        rows: np.ndarray | None = None,
        bits: int | None = None,
        *,
        frames: Sequence[int] | np.ndarray | None = None,
        groups: Sequence[str] | None = None,
        options: ReadOptions | None = None,
    ) -> None:
        if (paths is None) == (arrays is None):
            raise ValueError("ImageList needs exactly one of paths and arrays")
        if options is not None and bits is not None:
            raise ValueError("ImageList: give bits either as bits or in options, not both")
        self.origin = origin
        self.options = options if options is not None else ReadOptions(bits=bits)
        self.bits = self.options.bits  # of 16-bit files (load_image's bits)
        self._files: list[str] | None = list(paths) if paths is not None else None
        n_files = len(self._files) if self._files is not None else 0
        # per listed file: its slice (-1 = the file's default) and group key; None = not used
        self._frames = None if frames is None else np.asarray(frames, dtype=np.int64)
        self._groups = None if groups is None else list(groups)
        for name, extra in (("frames", self._frames), ("groups", self._groups)):
            if extra is not None and (self._files is None or len(extra) != n_files):
                raise ValueError(f"ImageList: {name} needs one entry per path ({n_files} paths)")
        self.arrays: list[tuple[str, np.ndarray]] = list(arrays or [])
        if rows is None:
            if self._files is not None:
                rows = np.arange(len(self._files))
            else:  # (array number, row) of every item, array after array
                rows = np.concatenate(
                    [np.stack([np.full(len(a), k), np.arange(len(a))], axis=1)
                     for k, (_, a) in enumerate(self.arrays)] or [np.zeros((0, 2), np.int64)]
                ).astype(np.int64)
        self._rows = rows

    @property
    def paths(self) -> list[str] | None:
        """The files of the listed items in order (None for arrays; a volume's file once per
        listed slice)."""
        if self._files is None:
            return None
        return [self._files[int(r)] for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def frame(self, i: int) -> int | None:
        """The slice / frame of item ``i`` (None: the file's default, or not a file)."""
        if self._frames is None:
            return None
        k = int(self._frames[int(self._rows[i])])
        return None if k < 0 else k

    def group_keys(self) -> list[str] | None:
        """Each item's group key (series / patient / CSV value), None when not grouped."""
        if self._groups is None:
            return None
        return [self._groups[int(r)] for r in self._rows]

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 ``H x W x 3``; may raise ``UnreadableImageError``."""
        if self._files is not None:
            return load_image(self._files[int(self._rows[i])], options=self.options, index=self.frame(i))
        k, row = self._rows[i]
        return np.ascontiguousarray(as_rgb(self.arrays[int(k)][1][int(row)]))

    def describe(self, i: int) -> str:
        if self._files is not None:
            frame = self.frame(i)
            path = self._files[int(self._rows[i])]
            return path if frame is None else f"{path}#slice={frame}"
        k, row = self._rows[i]
        return f"{self.origin}#{self.arrays[int(k)][0]}[{int(row)}]"

    def path(self, i: int) -> str | None:
        """The file of item ``i`` (None for array rows)."""
        return self._files[int(self._rows[i])] if self._files is not None else None

    def subset(self, idx: np.ndarray | Sequence[int]) -> ImageList:
        """The items ``idx`` (no pixels are copied)."""
        return ImageList(self.origin, self._files, None if self._files is not None else self.arrays,
                         rows=self._rows[np.asarray(idx, dtype=np.int64)], frames=self._frames,
                         groups=self._groups, options=self.options)

    def check_files(self) -> None:
        """``FileNotFoundError`` naming the first listed files that do not exist."""
        if self._files is None:
            return
        missing = [self._files[int(r)] for r in self._rows if not os.path.isfile(self._files[int(r)])]
        if missing:
            raise FileNotFoundError(
                f"{self.origin}: {len(missing)} listed image file(s) do not exist, e.g. "
                + ", ".join(missing[:3])
            )


def resolve_kind(path: str, kind: str, name: str) -> Kind:
    """``kind`` unless it is ``auto``: then npz / csv by suffix, folder for a directory.
    ``name`` starts the error messages (a missing path, an undecidable ``auto``)."""
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{name}: path does not exist")
    if kind != "auto":
        if kind not in ("folder", "csv", "npz"):
            raise ValueError(f"{name}: unknown kind {kind!r} (auto, folder, csv or npz)")
        return kind  # type: ignore[return-value]
    if full.lower().endswith(".npz"):
        return "npz"
    if full.lower().endswith(".csv"):
        return "csv"
    if os.path.isdir(full):
        return "folder"
    raise ValueError(f"{name}: kind 'auto' needs a folder, a .csv or a .npz file; set kind explicitly")


def scan_images(root: str, recursive: bool = True, name: str | None = None) -> list[str]:
    """Image files under ``root`` in a sorted walk (the same order on every machine), skipping
    dot-entries (macOS ``._x.jpg`` forks are not images).

    Symbolic links are followed once: a folder reached again (a link back up the tree, a link
    loop) is not walked twice, and a file reached again through a link is listed once; both
    are counted in one warning naming ``name`` (default ``root``). Only regular files (after
    following links) are listed: opening a FIFO named ``x.png`` would block forever, and a
    device or a broken link is no image either; they are counted in a warning."""
    root = os.path.expanduser(root)
    visited: set[str] = set()
    seen: set[str] = set()
    paths: list[str] = []
    special: list[str] = []
    loops = duplicates = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            loops += 1
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            full = os.path.join(dirpath, f)
            # DICOM from a PACS often has no extension: recognised by its preamble (a regular
            # file is opened for 132 bytes; a FIFO or a device never)
            if not is_image_file(f) and not is_dicom_file(full):
                continue
            if not os.path.isfile(full):  # stat follows links; S_ISREG only
                special.append(full)
                continue
            key = os.path.realpath(full)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            paths.append(full)
    if loops or duplicates:
        warnings.warn(
            f"{name or root}: symbolic links lead back into the tree ({loops} folder(s) reached "
            f"again, not walked twice; {duplicates} file(s) reached again, listed once)",
            stacklevel=2,
        )
    if special:
        warnings.warn(
            f"{name or root}: {len(special)} file(s) with an image name are not regular files "
            f"(a FIFO, a device or a broken link) and are skipped, e.g. {special[0]}",
            stacklevel=2,
        )
    return paths


def read_csv_rows(
    path: str, required: Sequence[str], split_column: str | None = None, split: str | None = None,
    name: str | None = None,
) -> list[dict[str, str]]:
    """Rows of a CSV manifest (only those whose ``split_column`` equals ``split`` when given);
    checks that the ``required`` columns exist. ``name`` starts the error messages."""
    name = name or path
    needed = list(required) + ([split_column] if split is not None and split_column else [])
    try:
        with open(os.path.expanduser(path), newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            absent = [c for c in needed if c not in columns]
            if absent:
                raise ValueError(
                    f"{name}: CSV has no column {', '.join(map(repr, absent))} "
                    f"(columns: {', '.join(columns) or 'none'})"
                )
            rows = [r for r in reader
                    if split is None or (r[split_column or ""] or "").strip() == split]
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{name}: {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not valid UTF-8); save the CSV as UTF-8") from err
    except csv.Error as err:  # a NUL byte, an unterminated quote at the end
        raise InputFileError(f"{name}: {path} is not a readable CSV ({err})") from err
    if not rows:
        where = f" with {split_column} == {split!r}" if split is not None else ""
        raise ValueError(f"{name}: CSV has no row{where}")
    return rows


def csv_base(path: str, root: str | None) -> str:
    """Folder that relative paths of a CSV manifest are relative to (default: the CSV's)."""
    return os.path.expanduser(root) if root else os.path.dirname(os.path.expanduser(path))


def read_npz_arrays(
    path: str, keys: Sequence[str], name: str | None = None
) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz``; ``ValueError`` naming the missing ones, or a file
    that is not a readable npz (truncated, another format)."""
    name = name or path
    try:
        with np.load(os.path.expanduser(path)) as npz:
            absent = [k for k in keys if k not in npz.files]
            if absent:
                raise ValueError(f"{name}: npz has no array {absent} (arrays: {', '.join(npz.files) or 'none'})")
            return {k: npz[k] for k in keys}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {path} does not exist") from err
    except ValueError as err:
        if "has no array" in str(err):
            raise
        raise InputFileError(f"{name}: {path} is not a readable .npz ({err})") from err
    except Exception as err:  # zipfile.BadZipFile, EOFError, OSError for truncated files
        size = os.path.getsize(os.path.expanduser(path)) if os.path.isfile(os.path.expanduser(path)) else 0
        raise InputFileError(
            f"{name}: {path} is empty, truncated or not an .npz archive ({size} bytes; "
            f"{type(err).__name__}: {err})") from err


def npz_splits(path: str) -> list[str]:
    """Split names ``s`` with an ``s_images`` array in the file."""
    with np.load(os.path.expanduser(path)) as npz:
        return sorted(k[: -len("_images")] for k in npz.files if k.endswith("_images"))


def check_image_array(name: str, key: str, arr: np.ndarray) -> None:
    """uint8 ``N x H x W`` or ``N x H x W x {1, 3}``, else ``ValueError``."""
    rgb = arr.ndim == 4 and arr.shape[3] in (1, 3)
    if arr.dtype != np.uint8 or not (arr.ndim == 3 or rgb):
        raise ValueError(
            f"{name}: {key!r} must be uint8 N x H x W or N x H x W x 3, got {arr.dtype} {arr.shape}"
        )


def image_extensions() -> str:
    return image_formats()
