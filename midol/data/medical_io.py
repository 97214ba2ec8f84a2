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
  DICOMs (RGB, YBR) are converted to RGB without windowing. Multi-frame files give frame 0.
* NIfTI: a 2-D image as it is; a 3-D volume gives one slice (default: the middle one along the
  last axis); a 4-D series gives that slice of volume 0. The window: the one given, else
  min-max over the finite values of the slice (NaN -> 0).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from typing import Any

import numpy as np

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")
MEDICAL_EXTENSIONS: tuple[str, ...] = DICOM_EXTENSIONS + NIFTI_EXTENSIONS
# raster formats PIL decodes (image_io's list): never sniffed for a DICOM preamble
RASTER_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")

Window = Sequence[float]  # (centre, width)


class MedicalReadError(Exception):
    """A DICOM/NIfTI file that cannot be turned into an image; the message says why."""


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
        if len(window) != 2:
            raise ValueError(f"a window is (centre, width), got {list(window)}")
        centre, width = float(window[0]), float(window[1])
        if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
            raise ValueError(f"window width must be > 0 and both values finite, got {list(window)}")
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


def read_dicom(path: str | os.PathLike[str], window: Window | None = None) -> np.ndarray:
    """A DICOM file as uint8 ``H x W x 3`` (rules in the module docstring)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, convert_color_space
    except ImportError as err:
        raise MedicalReadError("reading DICOM needs pydicom: pip install 'midol[medical]'") from err
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for bad or pixel-less files
        raise MedicalReadError(f"not a readable DICOM image ({type(err).__name__}: {err})") from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.dtype != np.uint8:
            pixels = apply_window(pixels, None if window is None else window)[..., :3]
        return np.ascontiguousarray(pixels.astype(np.uint8))
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is None:
        centre, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
        if centre is not None and width is not None and width > 0:
            window = (centre, width)
    grey = apply_window(values, window)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return _grey_rgb(grey)


MAX_NIFTI_VOXELS = 2**28  # 1 GiB as float32: a 512 x 512 x 1000 CT fits


def read_nifti(path: str | os.PathLike[str], window: Window | None = None, axis: int = -1,
               index: int | None = None) -> np.ndarray:
    """One slice of a NIfTI file as uint8 ``H x W x 3`` (rules in the module docstring)."""
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
    # only the wanted slice is read and scaled (scl_slope / scl_inter, as get_fdata applies them)
    where: list[Any] = [slice(None)] * len(shape)
    if len(shape) == 4:
        where[3] = 0
    if len(shape) >= 3:
        ax = axis % 3
        size = shape[ax]
        pick = 0 if size == 1 else (size // 2 if index is None else index)
        if not 0 <= pick < size:
            raise MedicalReadError(f"slice {pick} out of range (axis has {size})")
        where[ax] = pick
    try:
        data = np.asarray(image.dataobj[tuple(where)], dtype=np.float32)  # type: ignore[attr-defined]
    except Exception as err:
        raise MedicalReadError(f"not a readable NIfTI image ({type(err).__name__}: {err})") from err
    if data.ndim != 2:
        raise MedicalReadError(f"expected a 2-D, 3-D or 4-D image, got shape {data.shape}")
    return _grey_rgb(apply_window(data, window))


def read_medical(path: str | os.PathLike[str], window: Window | None = None) -> np.ndarray:
    """NIfTI by file name, DICOM by file name or content."""
    if not str(path).lower().endswith(NIFTI_EXTENSIONS):
        return read_dicom(path, window)
    return read_nifti(path, window)
