"""DICOM / NIfTI reading: midol's ``midol.data.medical_io`` (imported read-only) against MONAI's
``LoadImage`` (``PydicomReader`` / ``NibabelReader``) + ``ScaleIntensityRange``, on the real
test files pydicom and nibabel ship.

For each case the MONAI pipeline is given what midol decides by itself (the same window,
the same slice), so a difference is a difference of the readers: orientation, rescale,
MONOCHROME1, the file's own window, reading by content, refusing a decompression bomb.
Timing: best of 5 reads, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/medical_reader_compare.py
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import best_time, load_average  # noqa: E402
from midol.data.medical_io import read_dicom, read_nifti  # noqa: E402

DICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"
NIFTI_DIR = Path(nibabel.__file__).parent / "tests" / "data"


def monai_grey(path: Path, reader: str, lo: float | None, hi: float | None,
               slice_index: int | None = None) -> np.ndarray:
    """MONAI: LoadImage, then ScaleIntensityRange(lo..hi -> 0..255, clip), rounded to uint8
    (min-max when lo/hi are None). Returned in the file's row order (MONAI's readers swap the
    first two axes: transposed back here)."""
    from monai.transforms import LoadImage, ScaleIntensityRange

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = np.asarray(LoadImage(reader=reader, image_only=True)(str(path)), dtype=np.float64)
    if reader == "PydicomReader":
        image = image.T if image.ndim == 2 else image
    if slice_index is not None:
        image = image[..., slice_index]
    lo = float(image.min()) if lo is None else lo
    hi = float(image.max()) if hi is None else hi
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=255.0, clip=True)(image)
    return np.rint(np.asarray(scaled)).astype(np.uint8)


def diff(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    if ours.shape != theirs.shape:
        return {"equal": False, "why": f"shapes {ours.shape} vs {theirs.shape}"}
    d = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    return {"equal": bool(d.max() == 0), "max_abs_diff": int(d.max()), "pixels_differing": float((d > 0).mean())}


def timed(fn) -> float:
    return best_time(fn, repeats=5)[0]


def bomb_check(path: Path) -> str:
    """MONAI's NibabelReader on a header that declares 32e9 voxels, in a child process limited
    to 4 GiB of address space (so the machine is safe)."""
    code = ("import resource, warnings; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30));"
            "warnings.simplefilter('ignore');"
            "from monai.transforms import LoadImage;"
            f"LoadImage(reader='NibabelReader', image_only=True)({str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"exit {proc.returncode}: {last[:200]}"


def main() -> int:
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="reader_compare_"))
    try:
        ct = DICOM_DIR / "CT_small.dcm"
        ds = pydicom.dcmread(ct)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ours = read_dicom(ct)[..., 0]
        theirs = monai_grey(ct, "PydicomReader", float(hu.min()), float(hu.max()))
        rows.append({"case": "CT_small.dcm, rescale to HU, min-max", **diff(ours, theirs),
                     "midol_ms": 1e3 * timed(lambda: read_dicom(ct)),
                     "monai_ms": 1e3 * timed(lambda: monai_grey(ct, "PydicomReader", None, None))})
        ours = read_dicom(ct, window=(40, 400))[..., 0]
        theirs = monai_grey(ct, "PydicomReader", -160.0, 240.0)
        rows.append({"case": "CT_small.dcm, soft-tissue window 40/400", **diff(ours, theirs)})

        mr = DICOM_DIR / "MR_small.dcm"
        mds = pydicom.dcmread(mr)
        ours = read_dicom(mr)[..., 0]
        theirs = monai_grey(mr, "PydicomReader", None, None)
        rows.append({"case": "MR_small.dcm, no window given (midol: the file's Window Center/Width "
                     f"{mds.get('WindowCenter')}/{mds.get('WindowWidth')}; MONAI: ignores it, min-max)",
                     **diff(ours, theirs)})

        inverted = work / "mono1.dcm"
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(inverted)
        ours = read_dicom(inverted)[..., 0]
        theirs = monai_grey(inverted, "PydicomReader", float(hu.min()), float(hu.max()))
        rows.append({"case": "CT_small as MONOCHROME1", **diff(ours, theirs),
                     "monai_equals_uninverted": bool(np.array_equal(theirs, read_dicom(ct)[..., 0]))})

        bare = work / "IM0001"  # a PACS export: no extension
        shutil.copy(ct, bare)
        try:
            from monai.transforms import LoadImage

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LoadImage(image_only=True)(str(bare))
            auto = "read"
        except Exception as err:  # noqa: BLE001 - recording what MONAI does
            auto = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append({"case": "DICOM without extension, reader chosen automatically",
                     "midol": "read (DICM preamble)" if read_dicom(bare).shape else "?", "monai": auto})

        anat = NIFTI_DIR / "anatomical.nii"
        vol = nibabel.load(anat).get_fdata()
        mid = vol.shape[-1] // 2
        ours = read_nifti(anat)[..., 0]
        sl = vol[..., mid]
        theirs = monai_grey(anat, "NibabelReader", float(sl.min()), float(sl.max()), slice_index=mid)
        rows.append({"case": f"anatomical.nii {vol.shape}, middle slice, min-max", **diff(ours, theirs),
                     "midol_ms": 1e3 * timed(lambda: read_nifti(anat)),
                     "monai_ms": 1e3 * timed(lambda: monai_grey(anat, "NibabelReader", None, None,
                                                                slice_index=mid))})
        ex4 = NIFTI_DIR / "example4d.nii.gz"
        vol4 = nibabel.load(ex4).get_fdata()
        mid4 = vol4.shape[2] // 2
        ours = read_nifti(ex4)[..., 0]
        sl4 = vol4[:, :, mid4, 0]
        from monai.transforms import LoadImage

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = np.asarray(LoadImage(reader="NibabelReader", image_only=True)(str(ex4)), np.float64)
        theirs_sl = full[:, :, mid4, 0]
        theirs = np.rint((np.clip(theirs_sl, sl4.min(), sl4.max()) - sl4.min()) * 255.0
                         / (sl4.max() - sl4.min())).astype(np.uint8)
        rows.append({"case": f"example4d.nii.gz {vol4.shape}, volume 0, middle slice", **diff(ours, theirs),
                     "midol_ms": 1e3 * timed(lambda: read_nifti(ex4)),
                     "monai_ms": 1e3 * timed(lambda: LoadImage(reader="NibabelReader", image_only=True)(str(ex4)))})

        header = nibabel.Nifti1Header()
        header.set_data_shape((4000, 4000, 2000))
        header.set_data_dtype(np.float32)
        raw = header.binaryblock + b"\0" * 4 + b"\0" * 4096
        bomb = work / "bomb.nii.gz"
        bomb.write_bytes(gzip.compress(raw))
        try:
            read_nifti(bomb)
            ours_bomb = "read"
        except Exception as err:  # noqa: BLE001
            ours_bomb = f"{type(err).__name__}: {str(err)[:120]}"
        rows.append({"case": f"bomb.nii.gz ({os.path.getsize(bomb)} bytes declaring 4000x4000x2000)",
                     "midol": ours_bomb, "monai": bomb_check(bomb)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"load": load_average(), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
