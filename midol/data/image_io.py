"""Read any common image file into an 8-bit RGB array.

Conversion rules (one place, so every loader in midol treats pixels the same way):

* ``1``, ``L``: grey value copied to the three channels.
* ``LA``, ``RGBA``, ``PA``, ``P`` with transparency: the alpha channel is *dropped*, the colour
  values are kept as stored (no compositing). Medical images that carry alpha are almost always
  fully opaque; compositing on black would erase pixels whose alpha was written carelessly.
* ``P`` (palette): expanded to its palette colours.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: converted to RGB by Pillow.
* ``I;16*`` (unsigned 16-bit): the full 16-bit range is mapped linearly onto 0-255
  (``round(v / 257)``), so an 8-bit image stored as ``v * 257`` comes back exactly. Data that
  only use 12 bits of a 16-bit container would look dark: a source's ``bits: 12`` maps
  0-4095 onto 0-255 instead (the mapping stays fixed, so intensities stay comparable across
  images), and a 16-bit image below 4096 read without it is warned about once.
* ``I`` (32-bit signed): treated as 16-bit data when every value lies in 0-65535 (Pillow opens
  some 16-bit files this way), otherwise min-max scaled over the image.
* ``F`` (32-bit float): min-max scaled over the finite values (NaN/inf -> 0); a constant image -> 0.

Multi-frame files (GIF, TIFF stacks) give their first frame. DICOM and NIfTI files are read by
:mod:`midol.data.medical_io` (intensity windowing; optional pydicom / nibabel).

A source's :class:`~midol.data.medical_io.ReadOptions` change two rules: ``bits`` (above) and
``minmax``, which maps each image's own range onto 0-255 (16-bit values before any division,
other modes after their conversion to RGB). Windows and slices apply to DICOM / NIfTI only.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from midol.data.medical_io import (
    MEDICAL_EXTENSIONS,
    RASTER_EXTENSIONS,
    MedicalReadError,
    ReadOptions,
    is_medical_file,
    read_medical,
)
from midol.errors import UnreadableImageError

IMAGE_EXTENSIONS: tuple[str, ...] = RASTER_EXTENSIONS  # what PIL decodes


class UnreadableImageWarning(UserWarning):
    """Warned when a pipeline skips an unreadable image (filter on this category)."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with one of ``IMAGE_EXTENSIONS`` or a DICOM / NIfTI
    extension (any case). DICOM files without such a name are found by content
    (:func:`midol.data.medical_io.is_dicom_file`)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS)


def image_formats() -> str:
    """Every format midol reads, for error messages."""
    return (", ".join(IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS)
            + ", and DICOM files of any name (found by their DICM preamble)")


def load_image(path: str | os.PathLike[str], bits: int | None = None,
               options: ReadOptions | None = None, index: int | None = None) -> np.ndarray:
    """Decode ``path`` to a C-contiguous uint8 ``H x W x 3`` RGB array.

    ``bits``: the bit depth a 16-bit file's values use (e.g. 12 for X-ray and CT exports that
    store 0-4095): mapped from ``0 .. 2**bits - 1`` onto 0-255 instead of the full 16-bit range.
    Without it, a 16-bit image whose values all stay below 4096 is warned about once per process
    (mapped as 16-bit it is almost black). ``options``: a source's intensity, window and stack
    options (``bits`` is then ``options.bits``); ``index``: the slice of a NIfTI volume or the
    frame of a multi-frame DICOM (default: the middle one).

    Raises:
        UnreadableImageError: missing file, unknown format, truncated or corrupt data.
        ValueError: a window or a slice index for a raster image (PNG, JPEG, ...).
    """
    if options is not None and bits is not None:
        raise ValueError("give bits either as bits or in options, not both")
    opts = options if options is not None else ReadOptions(bits=bits)
    if is_medical_file(path):  # DICOM / NIfTI: windowed by midol.data.medical_io's rules
        try:
            return read_medical(path, index=index, options=opts)
        except MedicalReadError as err:
            raise UnreadableImageError(path, str(err)) from err
    if opts.windows or index is not None:
        raise ValueError(f"{path}: a window or a slice index applies to DICOM / NIfTI values, "
                         "not to a raster image")
    return _decode(Path(path), str(path), opts.bits, opts.minmax)


def decode_image_bytes(data: bytes, origin: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes (e.g. a shard member) -> uint8 ``H x W x 3`` with the same rules as
    :func:`load_image`; ``origin`` names the image in errors."""
    return _decode(io.BytesIO(data), origin)


def _decode(source: Any, origin: str, bits: int | None = None, minmax: bool = False) -> np.ndarray:
    try:
        with Image.open(source) as im:
            im.load()  # decode now: truncated files must fail here, not later
            rgb = _to_rgb_array(im, bits, origin, minmax)
    except UnreadableImageError:
        raise
    except Exception as err:  # Pillow raises many unrelated types for bad files
        raise UnreadableImageError(origin, f"{type(err).__name__}: {err}") from err
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UnreadableImageError(origin, f"unexpected decoded shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 ``H x W``, ``H x W x 1`` or ``H x W x 3`` array as ``H x W x 3`` (grey copied to
    the three channels): the one grey-to-RGB rule of every loader and transform."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected an H x W or H x W x 3 image, got shape {image.shape}")


class IntensityWarning(UserWarning):
    """A file whose stored intensities the default mapping would squash (e.g. 12 bits in 16)."""


_FEW_BITS_WARNED = False


def _to_rgb_array(im: Image.Image, bits: int | None = None, origin: str = "",
                  minmax: bool = False) -> np.ndarray:
    if minmax:
        if im.mode.startswith("I"):  # 16/32-bit values: their own range, before any rounding
            return as_rgb(_minmax(np.asarray(im).astype(np.float64)))
        return _minmax(_to_rgb_array(im, origin=origin).astype(np.float64))
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("1", "L"):
        return as_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode == "LA":
        return as_rgb(np.asarray(im, dtype=np.uint8)[..., 0])
    if mode in ("P", "PA"):
        return np.asarray(im.convert("RGBA"), dtype=np.uint8)[..., :3]
    if mode.startswith("I;16"):
        arr = np.asarray(im)
        if arr.dtype.kind == "u":
            return as_rgb(_scale_uint16(arr, bits, origin))
        return as_rgb(_minmax(arr.astype(np.float64)))
    if mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return as_rgb(_scale_uint16(arr, bits, origin))
        return as_rgb(_minmax(arr.astype(np.float64)))
    if mode == "F":
        return as_rgb(_minmax(np.asarray(im, dtype=np.float64)))
    # RGBA/RGBa/RGBX drop the 4th channel, CMYK/YCbCr/LAB/HSV are colour-converted.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _scale_uint16(arr: np.ndarray, bits: int | None = None, origin: str = "") -> np.ndarray:
    if bits is not None:  # the source says how many bits its values use
        top = float(2**bits - 1)
        return np.rint(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)
    global _FEW_BITS_WARNED
    peak = int(arr.max()) if arr.size else 0
    if 255 < peak < 4096 and not _FEW_BITS_WARNED:
        _FEW_BITS_WARNED = True
        warnings.warn(
            f"{origin}: a 16-bit image whose values stay below 4096 (at most {peak}: 12 bits "
            "used); mapped over the full 16-bit range it trains at 0-16 of 255, almost black. "
            "If the source stores 12-bit data, set its bits: 12 (DataSource); warned once",
            IntensityWarning, stacklevel=4)
    # 65535 / 257 == 255 exactly, so v * 257 round-trips to v.
    return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)


def _minmax(arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    out = np.zeros(arr.shape, dtype=np.float64)
    if hi > lo:
        out[finite] = (arr[finite] - lo) * (255.0 / (hi - lo))
    return np.rint(out).astype(np.uint8)
