"""Where pre-training images come from: folders, CSV lists and MedMNIST-style ``.npz`` files.

A :class:`DataSource` is a plain, config-friendly description (it appears in YAML as an entry of
``data.sources``). :func:`resolve_source` turns it into an :class:`~midol.data.readers.ImageList`
(file paths decoded lazily, or rows of in-memory uint8 arrays) with the package's one reader stack.

Per source, how files become images (``intensity``, ``bits``, ``window``), how a volume becomes
items (``slices``: only its headers are read at scan time, never its voxels) and what one draw
unit is (``group_by``: the sampler gives each group of a source an equal share, so a 300-slice
CT series weighs as much as one X-ray, not 300).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from midol.data.medical_io import (
    NIFTI_EXTENSIONS,
    MedicalHeader,
    MedicalReadError,
    ReadOptions,
    is_medical_file,
    read_header,
)
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
SLICE_KEYS = ("stride", "stack")
VOLUME = "<volume file>"  # the default group of a volume's slices: its file


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
        intensity: ``auto`` (each format's rule: a DICOM's own window, else min-max; 16-bit
            files over ``bits`` or 16 bits, warned when they use 12) or ``minmax`` (each
            image's own range onto 0-255, ignoring file windows).
        window: DICOM (after rescale, e.g. Hounsfield units) and NIfTI only: ``[centre,
            width]``, or three windows ``[[c, w], [c, w], [c, w]]`` as the RGB channels (CT
            lung / mediastinum / bone); values outside a window clip to 0 / 255.
        slices: volumes (NIfTI 3-D / 4-D, multi-frame DICOM) along their last axis / frames:
            ``middle`` (one item per file), ``all`` (one item per slice), ``{stride: n}`` (every
            n-th slice from the first), ``{stack: 3}`` (every slice, with its two neighbours as
            the channels: 2.5-D; with ``stride`` every n-th). A 2-D file stays one item.
        group_by: the draw unit: ``series`` (a NIfTI file, a DICOM SeriesInstanceUID, any other
            file alone), ``patient`` (DICOM PatientID) or a column of the CSV (read before the
            two names). The sampler weights each item by ``weight / (items in its group)``:
            each group of the source is drawn equally often whatever its slice count.
            ``item``: each item is its own group. Default: ``item``, except that a volume
            expanded by ``slices`` (``all``, ``stride``, ``stack``) is one group: a 300-slice
            CT is one draw unit, as a 2-D image is, not 300.
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
    intensity: Literal["auto", "minmax"] = "auto"
    window: list[float] | list[list[float]] | None = None
    slices: str | dict[str, int] = "middle"
    group_by: str | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and not 8 <= int(self.bits) <= 16:
            raise ValueError(f"{self.describe()}: bits must be between 8 and 16, got {self.bits!r}")
        if self.intensity not in ("auto", "minmax"):
            raise ValueError(f"{self.describe()}: intensity must be auto or minmax, got {self.intensity!r}")
        if self.window is not None and self.bits is not None:
            raise ValueError(f"{self.describe()}: bits applies to 16-bit PNG / TIFF files and window "
                             "to DICOM / NIfTI values; a source takes one of them")
        if self.group_by is not None and not str(self.group_by).strip():
            raise ValueError(f"{self.describe()}: group_by is empty (series, patient or a CSV column)")
        self.read_options()  # window / intensity / stack checks, named
        self.slice_policy()
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

    def read_options(self) -> ReadOptions:
        """The reader's options; ``ValueError`` naming the source for a bad combination."""
        windows: list[tuple[float, float]] = []
        items: list[Any] = list(self.window) if self.window is not None else []
        number = (int, float)
        if len(items) == 2 and all(isinstance(v, number) for v in items):
            windows = [(float(items[0]), float(items[1]))]
        elif items and all(isinstance(v, (list, tuple)) and len(v) == 2
                           and all(isinstance(x, number) for x in v) for v in items):
            windows = [(float(v[0]), float(v[1])) for v in items]
        elif self.window is not None:
            raise ValueError(f"{self.describe()}: window must be [centre, width] or a list of "
                             f"three such windows (one per channel), got {self.window!r}")
        try:
            return ReadOptions(bits=None if self.bits is None else int(self.bits),
                               minmax=self.intensity == "minmax", windows=tuple(windows),
                               stack=self.slice_policy()[1])
        except ValueError as err:
            raise ValueError(f"{self.describe()}: {err}") from err

    def slice_policy(self) -> tuple[int | None, int]:
        """``(stride, stack)``: stride None for ``middle`` (one item per file), else every
        stride-th slice; stack 1 or 3 channels of neighbouring slices."""
        policy = self.slices
        if policy == "middle":
            return None, 1
        if policy == "all":
            return 1, 1
        if isinstance(policy, dict) and policy and set(policy) <= set(SLICE_KEYS):
            stride, stack = policy.get("stride", 1), policy.get("stack", 1)
            if not (isinstance(stride, int) and stride >= 1):
                raise ValueError(f"{self.describe()}: slices stride must be an integer >= 1, got {stride!r}")
            if stack not in (1, 3):
                raise ValueError(f"{self.describe()}: slices stack must be 1 or 3 (slices as the RGB "
                                 f"channels), got {stack!r}")
            return stride, int(stack)
        raise ValueError(f"{self.describe()}: slices must be middle, all, {{stride: n}} or "
                         f"{{stack: 3}} (with an optional stride), got {policy!r}")

    def resolved_kind(self) -> Literal["folder", "csv", "npz"]:
        """The concrete kind; raises when ``auto`` cannot decide or the path is missing."""
        return resolve_kind(self.path, self.kind, self.describe())


def filter_paths(paths: list[str], source: DataSource, base: str) -> list[str]:
    """``paths`` kept by the source's ``include`` / ``exclude`` globs (matched against the path
    relative to ``base``); an error naming the patterns when nothing is left."""
    return [p for p, keep in zip(paths, filter_mask(paths, source, base), strict=True) if keep]


def filter_mask(paths: list[str], source: DataSource, base: str) -> list[bool]:
    """Per path, whether :func:`filter_paths` keeps it."""
    if source.include is None and not source.exclude:
        return [True] * len(paths)
    if source.kind == "npz" or (source.include is not None and not source.include):
        raise ValueError(f"{source.describe()}: include must name at least one pattern")

    def rel(p: str) -> str:
        return os.path.relpath(p, base).replace(os.sep, "/")

    mask = [(source.include is None or any(fnmatch.fnmatchcase(rel(p), g) for g in source.include))
            and not any(fnmatch.fnmatchcase(rel(p), g) for g in source.exclude) for p in paths]
    if not any(mask):
        raise ValueError(f"{source.describe()}: include {source.include} / exclude {source.exclude} "
                         f"leave none of its {len(paths)} images")
    return mask


def source_table(sources: list[DataSource], sizes: list[int], groups: list[int] | None = None) -> str:
    """The start-up table: per source its modality, kind, images, weight, share of the draws
    (weight x groups over the total: the sampler draws each group of a source equally often)
    and groups (the draw units; = images without ``group_by``), then per modality."""
    groups = list(sizes) if groups is None else list(groups)
    draws = [s.weight * g for s, g in zip(sources, groups, strict=True)]
    total = sum(draws) or 1.0
    lines = ["| source | modality | kind | images | weight | share of draws | groups |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s, n, d, g in zip(sources, sizes, draws, groups, strict=True):
        by = s.group_by or ("volume" if s.kind != "npz" and s.slice_policy()[0] is not None else None)
        unit = f" ({by})" if by and by != "item" else ""
        lines.append(f"| {s.path} | {s.modality} | {s.resolved_kind()} | {n} | {s.weight:g} | "
                     f"{d / total:.1%} | {g}{unit} |")
    per: dict[str, list[float]] = {}
    for s, n, d, g in zip(sources, sizes, draws, groups, strict=True):
        entry: list[float] = per.setdefault(s.modality, [0, 0.0, 0])
        entry[0] += n
        entry[1] += d
        entry[2] += g
    lines.append("| **per modality** | | | | | | |")
    for modality, (n, d, g) in per.items():
        lines.append(f"| | {modality} | | {int(n)} | | {d / total:.1%} | {int(g)} |")
    return "\n".join(lines)


def _medical_headers(paths: list[str], name: str, need: bool) -> list[MedicalHeader | None]:
    """Per path its DICOM / NIfTI header (slices, series, patient), None for a raster file;
    only read when ``need``. A header that cannot be read (a corrupt file) leaves the file one
    item in a group of its own, as a broken PNG is: its load fails and is reported like any
    unreadable image; the scan warns once with the count."""
    out: list[MedicalHeader | None] = []
    broken: list[str] = []
    for p in paths:
        if not need or not is_medical_file(p):
            out.append(None)
            continue
        try:
            out.append(read_header(p))
        except MedicalReadError as err:
            broken.append(f"{p}: {err}")
            out.append(MedicalHeader(1, p, p))
    if broken:
        warnings.warn(f"{name}: {len(broken)} DICOM / NIfTI header(s) could not be read; each such "
                      f"file stays one item in a group of its own (e.g. {broken[0]})", stacklevel=3)
    return out


def _group_key(source: DataSource, by: str, path: str, header: MedicalHeader | None,
               cell: str | None) -> str:
    """The group of one file under ``by`` (see ``DataSource.group_by``)."""
    name = source.describe()
    if by == VOLUME:
        return path
    if cell is not None:
        if not cell.strip():
            raise ValueError(f"{name}: {path} has an empty {by!r} cell (group_by)")
        return cell.strip()
    if by == "series":
        if header is None or path.lower().endswith(NIFTI_EXTENSIONS):
            return path  # a raster file or a NIfTI volume: one series
        if header.series is None:
            raise ValueError(f"{name}: {path} has no SeriesInstanceUID (group_by: series); "
                             "group by a CSV column instead")
        return header.series
    if header is None or path.lower().endswith(NIFTI_EXTENSIONS) or header.patient is None:
        what = "has no PatientID" if header is not None and header.patient is None else "is not DICOM"
        raise ValueError(f"{name}: {path} {what} (group_by: patient reads DICOM PatientID); "
                         "list the patient in a CSV column and group by it")
    return header.patient


def _file_list(source: DataSource, paths: list[str], cells: list[str] | None) -> ImageList:
    """The items of ``paths`` under the source's slice, window and group options."""
    name = source.describe()
    options = source.read_options()
    stride, _ = source.slice_policy()
    if options.windows:  # a window maps modality values; a PNG's 0-255 has none
        raster = next((p for p in paths if not is_medical_file(p)), None)
        if raster is not None:
            raise ValueError(f"{name}: window applies to DICOM / NIfTI values, but {raster} is a "
                             "raster image (exclude such files, or drop window)")
    by = source.group_by
    if by == "item" and cells is None:
        by = None
    elif by is None and stride is not None:
        by = VOLUME  # an expanded volume is one draw unit unless the user says otherwise
    if by is not None and by != VOLUME and cells is None and by not in ("series", "patient"):
        raise ValueError(f"{name}: group_by must be series, patient or a column of a CSV source, got {by!r}")
    headers = _medical_headers(paths, name, stride is not None or (cells is None and by is not None))
    files: list[str] = []
    frames: list[int] = []
    keys: list[str] = []
    for k, (p, header) in enumerate(zip(paths, headers, strict=True)):
        count = header.slices if header is not None and stride is not None else 1
        picks = list(range(0, count, stride or 1)) if count > 1 else [-1]
        files += [p] * len(picks)
        frames += picks
        if by is not None:
            keys += [_group_key(source, by, p, header, None if cells is None else cells[k])] * len(picks)
    return ImageList(source.path, paths=files, frames=frames if stride is not None else None,
                     groups=keys if by is not None else None, options=options)


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
        return _file_list(source, paths, None)
    if kind == "csv":
        rows = read_csv_rows(source.path, [source.path_column], name=name)
        rows = [r for r in rows if (r.get(source.path_column) or "").strip()]
        base = csv_base(source.path, source.root)
        paths = [os.path.join(base, os.path.expanduser((r.get(source.path_column) or "").strip()))
                 for r in rows]
        if not paths:
            raise ValueError(f"{name}: CSV column {source.path_column!r} lists no path")
        mask = filter_mask(paths, source, base)
        rows = [r for r, keep in zip(rows, mask, strict=True) if keep]
        paths = [p for p, keep in zip(paths, mask, strict=True) if keep]
        # a column named like the group_by is read before the names series / patient
        column = source.group_by if source.group_by is not None and source.group_by in rows[0] else None
        cells = [r.get(column) or "" for r in rows] if column is not None else None
        return _file_list(source, paths, cells)
    if source.window is not None or source.intensity != "auto" or source.slice_policy()[0] is not None \
            or source.group_by is not None:
        raise ValueError(f"{name}: an npz holds 8-bit images: intensity, window, slices and "
                         "group_by apply to file sources (folder, csv)")
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
