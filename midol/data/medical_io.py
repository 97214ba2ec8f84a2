"""DICOM and NIfTI files as 8-bit RGB arrays, with intensity windowing.

Optional readers (``pip install 'midol[medical]'``: pydicom for DICOM, nibabel for NIfTI);
:func:`midol.data.image_io.load_image` calls them for ``.dcm`` / ``.dicom`` / ``.nii`` /
``.nii.gz`` files, so every loader of midol reads them the same way.

Intensity rules (one place, like :mod:`midol.data.image_io`'s):

* DICOM: stored values -> modality values with the file's Rescale Slope / Intercept (e.g.
  Hounsfield units for CT); then the window: the one given, else the file's first Window
  Center / Width, else min-max over the image. Values below / above the window become 0 / 255
  (DICOM's linear VOI function, PS3.3 C.11.2.1.2, without its half-pixel offsets).
  ``MONOCHROME1`` (bright = low values) is inverted so bright means dense everywhere. Colour
  DICOMs (RGB, YBR) are converted to RGB without windowing. A multi-frame file gives one frame
  (default: the middle one; frames are a volume's slices).
* NIfTI: a 2-D image as it is; a 3-D volume gives one slice (default: the middle one along the
  last axis); a 4-D series gives that slice of volume 0. The window: the one given, else
  min-max over the finite values of the slice (NaN -> 0).
* :class:`ReadOptions` (a source's ``intensity`` / ``window`` / ``slices``): ``minmax``
  ignores the file's window; three windows give the three channels (e.g. CT lung,
  mediastinum and bone: each channel is the same HU slice seen through its window); ``stack=3``
  gives the slice and its two neighbours as the channels (2.5-D; at the first and last slice
  the missing neighbour repeats the edge slice), all three through one window (min-max: one
  range over the three, so the channels stay comparable).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")
MEDICAL_EXTENSIONS: tuple[str, ...] = DICOM_EXTENSIONS + NIFTI_EXTENSIONS
# raster formats PIL decodes (image_io's list): never sniffed for a DICOM preamble
RASTER_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")

Window = Sequence[float]  # (centre, width)


class MedicalReadError(Exception):
    """A DICOM/NIfTI file that cannot be turned into an image; the message says why."""


@dataclass(frozen=True)
class ReadOptions:
    """How one source's files become 8-bit RGB (built from a ``DataSource``'s options).

    Attributes:
        bits: bit depth of 16-bit raster files (PNG / TIFF): ``0 .. 2**bits - 1`` -> 0-255.
        minmax: min-max over each image, ignoring a DICOM's own window and the 16-bit range.
        windows: ``()`` (the file's window, else min-max), one ``(centre, width)`` for grey, or
            three: one per RGB channel (DICOM after rescale, NIfTI).
        stack: 1, or 3 for the slice and its two neighbours as the channels (2.5-D).
    """

    bits: int | None = None
    minmax: bool = False
    windows: tuple[tuple[float, float], ...] = ()
    stack: int = 1

    def __post_init__(self) -> None:
        if len(self.windows) not in (0, 1, 3):
            raise ValueError(f"give one window (grey) or three (one per RGB channel), got {len(self.windows)}")
        for w in self.windows:
            check_window(w)
        if self.stack not in (1, 3):
            raise ValueError(f"stack must be 1 or 3 (slices as the RGB channels), got {self.stack}")
        if self.stack == 3 and len(self.windows) == 3:
            raise ValueError("stack: 3 and three windows both fill the 3 channels; choose one")
        if self.minmax and (self.windows or self.bits is not None):
            raise ValueError("intensity: minmax sets the mapping itself; drop window / bits")


class MedicalHeader(NamedTuple):
    """What the scan needs from a DICOM / NIfTI header (no voxel is read)."""

    slices: int  # along the slice axis (NIfTI's last spatial axis, DICOM frames); 1 for 2-D
    series: str | None  # DICOM SeriesInstanceUID
    patient: str | None  # DICOM PatientID


def read_header(path: str | os.PathLike[str]) -> MedicalHeader:
    """Slice count and DICOM identifiers from the header alone; ``MedicalReadError`` when the
    header cannot be read (the scan cannot list the file's slices)."""
    if str(path).lower().endswith(NIFTI_EXTENSIONS):
        try:
            import nibabel

            shape = tuple(int(n) for n in nibabel.load(str(path)).header.get_data_shape())  # type: ignore[attr-defined]
        except Exception as err:  # ImportError included: the message names the cause
            raise MedicalReadError(f"not a readable NIfTI header ({type(err).__name__}: {err})") from err
        return MedicalHeader(shape[2] if len(shape) >= 3 else 1, None, None)
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["NumberOfFrames", "SeriesInstanceUID", "PatientID"])
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as err:
        raise MedicalReadError(f"not a readable DICOM header ({type(err).__name__}: {err})") from err

    def text(key: str) -> str | None:
        value = str(ds.get(key, "") or "").strip()
        return value or None

    return MedicalHeader(frames, text("SeriesInstanceUID"), text("PatientID"))


def stack_indices(pick: int, size: int, stack: int) -> list[int]:
    """``[pick]``, or ``pick`` and its neighbours clamped to ``0 .. size - 1`` (edge repeated)."""
    if stack == 1:
        return [pick]
    return [min(max(pick + d, 0), size - 1) for d in range(-(stack // 2), stack // 2 + 1)]


def check_window(window: Window) -> tuple[float, float]:
    """``(centre, width)`` as floats; ``ValueError`` unless finite with width > 0."""
    if len(window) != 2:
        raise ValueError(f"a window is (centre, width), got {list(window)}")
    centre, width = float(window[0]), float(window[1])
    if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
        raise ValueError(f"window width must be > 0 and both values finite, got {list(window)}")
    return centre, width


def render(values: np.ndarray, options: ReadOptions, file_window: Window | None = None) -> np.ndarray:
    """Modality values -> uint8 ``H x W x 3``: ``H x W`` (one slice) or ``3 x H x W`` (a stack).

    Three windows make the channels; otherwise one window (the configured one, else the file's
    unless ``minmax``, else min-max over all values) for the grey slice or the whole stack."""
    if len(options.windows) == 3:
        return np.ascontiguousarray(np.stack([apply_window(values, w) for w in options.windows], axis=-1))
    window = options.windows[0] if options.windows else (None if options.minmax else file_window)
    grey = apply_window(values, window)
    if grey.ndim == 3:  # a stack: slices become the channels
        return np.ascontiguousarray(np.moveaxis(grey, 0, -1))
    return _grey_rgb(grey)


def has_dicom_preamble(path: str | os.PathLike[str]) -> bool:
    """A regular file whose bytes 128-131 are ``DICM`` (a DICOM Part 10 file, whatever its
    name: PACS exports often have none). Never opens a FIFO or a device."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """DICOM by extension, or by content when the name has no image extension."""
    name = str(path).lower()
    if name.endswith(DICOM_EXTENSIONS):
        return True
    if name.endswith(NIFTI_EXTENSIONS) or name.endswith(RASTER_EXTENSIONS):
        return False
    return has_dicom_preamble(path)


def is_medical_file(path: str | os.PathLike[str]) -> bool:
    """DICOM (by extension or content) or NIfTI (by extension)."""
    return str(path).lower().endswith(NIFTI_EXTENSIONS) or is_dicom_file(path)


def apply_window(values: np.ndarray, window: Window | None) -> np.ndarray:
    """float values -> uint8: linear inside ``(centre, width)``, clipped outside; min-max over
    the finite values when ``window`` is None. NaN and inf -> 0."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    if window is None:
        if not finite.any():
            return np.zeros(arr.shape, dtype=np.uint8)
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
    else:
        centre, width = check_window(window)
        lo, hi = centre - width / 2, centre + width / 2
    out = np.zeros(arr.shape, dtype=np.float64)
    if hi > lo:
        out[finite] = (np.clip(arr[finite], lo, hi) - lo) * 255.0 / (hi - lo)
    return np.rint(out).astype(np.uint8)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def _first_value(value: object) -> float | None:
    if value is None:
        return None
    try:
        seq = list(value)  # type: ignore[call-overload]
    except TypeError:
        seq = [value]
    try:
        return float(seq[0]) if seq else None
    except (TypeError, ValueError):
        return None


def _options(window: Window | None, options: ReadOptions | None) -> ReadOptions:
    if options is None:
        return ReadOptions(windows=() if window is None else (check_window(window),))
    if window is not None:
        raise ValueError("give the window either as window or in options, not both")
    return options


def _pick(index: int | None, size: int, what: str) -> int:
    pick = size // 2 if index is None else index
    if not 0 <= pick < size:
        raise MedicalReadError(f"{what} {pick} out of range (the file has {size})")
    return pick


def read_dicom(path: str | os.PathLike[str], window: Window | None = None,
               frame: int | None = None, options: ReadOptions | None = None) -> np.ndarray:
    """A DICOM file as uint8 ``H x W x 3`` (rules in the module docstring); ``frame`` of a
    multi-frame file (default: the middle one)."""
    opts = _options(window, options)
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, convert_color_space, pixel_array
    except ImportError as err:
        raise MedicalReadError("reading DICOM needs pydicom: pip install 'midol[medical]'") from err
    try:
        ds = pydicom.dcmread(str(path))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:  # decode only the frames used, not the whole cine / volume
            picks = stack_indices(_pick(frame, frames, "frame"), frames, opts.stack)
            decoded = [pixel_array(ds, index=j) for j in picks]
            pixels = decoded[0] if len(decoded) == 1 else np.stack(decoded)
        else:
            _pick(frame, 1, "frame")
            pixels = ds.pixel_array
            if opts.stack == 3:
                pixels = np.stack([pixels] * 3)  # one slice: its own neighbours (edge rule)
    except MedicalReadError:
        raise
    except Exception as err:  # pydicom raises many types for bad or pixel-less files
        raise MedicalReadError(f"not a readable DICOM image ({type(err).__name__}: {err})") from err
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:
        if opts.stack == 3 or len(opts.windows) == 3:
            raise MedicalReadError(f"a colour ({photometric}) image: stack / three windows need grey values")
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.dtype != np.uint8 or opts.minmax:  # one range over the three channels
            pixels = apply_window(pixels, opts.windows[0] if opts.windows else None)[..., :3]
        return np.ascontiguousarray(pixels.astype(np.uint8))
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    file_window: Window | None = None
    centre, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if centre is not None and width is not None and width > 0:
        file_window = (centre, width)
    rgb = render(values, opts, file_window)
    if photometric == "MONOCHROME1":
        rgb = 255 - rgb  # bright = dense, as in MONOCHROME2
    return rgb


MAX_NIFTI_VOXELS = 2**28  # 1 GiB as float32: a 512 x 512 x 1000 CT fits


def read_nifti(path: str | os.PathLike[str], window: Window | None = None, axis: int = -1,
               index: int | None = None, options: ReadOptions | None = None) -> np.ndarray:
    """One slice (``index``, default the middle one, along ``axis``) of a NIfTI file as uint8
    ``H x W x 3``, or with ``options.stack == 3`` that slice and its neighbours as channels
    (rules in the module docstring)."""
    opts = _options(window, options)
    try:
        import nibabel
    except ImportError as err:
        raise MedicalReadError("reading NIfTI needs nibabel: pip install 'midol[medical]'") from err
    try:
        image = nibabel.load(str(path))  # the header only: the voxels stay on disk
        shape = tuple(int(n) for n in image.header.get_data_shape())  # type: ignore[attr-defined]
    except Exception as err:  # nibabel: ImageFileError, EOFError, zlib errors, ...
        raise MedicalReadError(f"not a readable NIfTI image ({type(err).__name__}: {err})") from err
    voxels = math.prod(shape) if shape else 0
    if voxels > MAX_NIFTI_VOXELS:
        # a few hundred KB of .nii.gz can declare gigabytes (issue 26 item 9): refuse before reading
        raise MedicalReadError(
            f"declares {'x'.join(map(str, shape))} = {voxels:,} voxels, more than the "
            f"{MAX_NIFTI_VOXELS:,} midol reads from one file (a decompression bomb, or a volume "
            "to cut into slices first)")
    if len(shape) not in (2, 3, 4):
        raise MedicalReadError(f"expected a 2-D, 3-D or 4-D image, got shape {shape}")
    # only the wanted slices are read and scaled (scl_slope / scl_inter, as get_fdata applies them)
    where: list[Any] = [slice(None)] * len(shape)
    if len(shape) == 4:
        where[3] = 0
    picks = [0]
    if len(shape) >= 3:
        ax = axis % 3
        size = shape[ax]
        pick = 0 if size == 1 and index is None else _pick(index, size, "slice")
        picks = stack_indices(pick, size, opts.stack)
    elif index not in (None, 0):
        raise MedicalReadError(f"slice {index} out of range (a 2-D image)")
    slices = []
    for pick in picks:
        if len(shape) >= 3:
            where[axis % 3] = pick
        try:
            data = np.asarray(image.dataobj[tuple(where)], dtype=np.float32)  # type: ignore[attr-defined]
        except Exception as err:
            raise MedicalReadError(f"not a readable NIfTI image ({type(err).__name__}: {err})") from err
        if data.ndim != 2:
            raise MedicalReadError(f"expected a 2-D, 3-D or 4-D image, got shape {data.shape}")
        slices.append(data)
    return render(slices[0] if len(slices) == 1 else np.stack(slices), opts)


def read_medical(path: str | os.PathLike[str], window: Window | None = None,
                 index: int | None = None, options: ReadOptions | None = None) -> np.ndarray:
    """NIfTI by file name, DICOM by file name or content; ``index``: the slice (NIfTI's last
    axis) or frame (DICOM), default the middle one."""
    if not str(path).lower().endswith(NIFTI_EXTENSIONS):
        return read_dicom(path, window, frame=index, options=options)
    return read_nifti(path, window, index=index, options=options)
