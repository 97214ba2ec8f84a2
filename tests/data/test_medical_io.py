"""DICOM and NIfTI through the one image loader, on the real test files pydicom and nibabel
ship: modality LUT (rescale), file or configured windows, MONOCHROME1, slices of volumes."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from midol.data.image_io import UnreadableImageError, is_image_file, load_image  # noqa: E402  (after the importorskip of the optional readers)
from midol.data.medical_io import MedicalReadError, apply_window, read_dicom, read_nifti  # noqa: E402

DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
NIFTI_DIR = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")


def restated_window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint((np.clip(values, lo, hi) - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def test_ct_rescaled_to_hounsfield_then_min_max():
    path = os.path.join(DICOM_DIR, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ds.get("WindowCenter") is None  # no window in the file: min-max
    expected = restated_window(hu, hu.min(), hu.max())
    image = load_image(path)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], expected)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_ct_with_a_configured_soft_tissue_window():
    path = os.path.join(DICOM_DIR, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_dicom(path, window=(40, 400))
    np.testing.assert_array_equal(image[..., 0], restated_window(hu, -160, 240))
    assert (image[..., 0][hu <= -160] == 0).all() and (image[..., 0][hu >= 240] == 255).all()


def test_mr_uses_the_files_own_window():
    path = os.path.join(DICOM_DIR, "MR_small.dcm")
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None:
        pytest.skip("this pydicom's MR_small.dcm has no window")
    c = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
    w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    np.testing.assert_array_equal(load_image(path)[..., 0], restated_window(values, c - w / 2, c + w / 2))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "CT_small.dcm"))
    normal = read_dicom(os.path.join(DICOM_DIR, "CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "inverted.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(load_image(path), 255 - normal)


def test_truncated_dicom_names_the_file_and_the_cause():
    path = os.path.join(DICOM_DIR, "MR_truncated.dcm")
    with pytest.raises(UnreadableImageError, match="MR_truncated.dcm: not a readable DICOM image"):
        load_image(path)


def test_nifti_volume_gives_its_middle_slice_min_max():
    path = os.path.join(NIFTI_DIR, "anatomical.nii")
    data = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
    assert data.ndim == 3
    middle = data[:, :, data.shape[2] // 2].astype(np.float64)
    image = load_image(path)
    np.testing.assert_array_equal(image[..., 1], restated_window(middle, middle.min(), middle.max()))
    np.testing.assert_array_equal(read_nifti(path, axis=0, index=3)[..., 0],
                                  apply_window(data[3].astype(np.float64), None))
    with pytest.raises(MedicalReadError, match="out of range"):
        read_nifti(path, index=10_000)


def test_nifti_4d_uses_volume_zero():
    path = os.path.join(NIFTI_DIR, "example4d.nii.gz")
    data = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
    assert data.ndim == 4
    vol = data[..., 0]
    expected = apply_window(vol[:, :, vol.shape[2] // 2].astype(np.float64), None)
    np.testing.assert_array_equal(load_image(path)[..., 0], expected)


def test_extensions_and_missing_package(monkeypatch):
    assert is_image_file("a/b/scan.DCM") and is_image_file("x.nii.gz") and is_image_file("x.nii")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(UnreadableImageError, match=r"needs pydicom: pip install 'midol\[medical\]'"):
        load_image(os.path.join(DICOM_DIR, "CT_small.dcm"))


def test_window_validation():
    with pytest.raises(ValueError, match="width must be > 0"):
        apply_window(np.zeros((2, 2)), (0, 0))
    np.testing.assert_array_equal(apply_window(np.array([[np.nan, 1.0], [2.0, 3.0]]), None),
                                  np.array([[0, 0], [128, 255]], dtype=np.uint8))


def test_nifti_bomb_is_refused_from_its_header_before_any_voxel_is_read(tmp_path):
    """A .nii.gz of a few hundred bytes declaring 4000 x 4000 x 2000 voxels (issue 26 item 9:
    such files cost gigabytes and raised MemoryError): one line naming the declared size, and
    the file is skipped like any unreadable image."""
    import gzip
    import tracemalloc

    header = nibabel.Nifti1Header()
    header.set_data_shape((4000, 4000, 2000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 4096)
    assert path.stat().st_size < 2_000
    tracemalloc.start()
    with pytest.raises(UnreadableImageError, match=r"bomb.nii.gz: .*4000x4000x2000 = 32,000,000,000 voxels"):
        load_image(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20  # nothing of the declared 128 GB was allocated


def test_nifti_slice_is_read_alone_and_equals_the_full_read(tmp_path):
    """Only the wanted slice is read (a real volume, scaled by scl_slope / scl_inter)."""
    path = os.path.join(NIFTI_DIR, "anatomical.nii")
    full = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(read_nifti(path, axis=1, index=5)[..., 0],
                                  apply_window(full[:, 5, :].astype(np.float64), None))


def test_dicom_without_an_extension_is_found_by_its_preamble(tmp_path):
    """Issue 28 item 2: PACS exports name DICOM files without an extension; they were ignored.
    Recognised by the DICM preamble; other extensionless files, and a FIFO, are not opened as
    images."""
    import shutil

    from midol.data.readers import image_extensions, scan_images

    src = os.path.join(DICOM_DIR, "CT_small.dcm")
    (tmp_path / "series").mkdir()
    shutil.copy(src, tmp_path / "series" / "IM000001")
    (tmp_path / "series" / "README").write_text("not an image")
    os.mkfifo(tmp_path / "series" / "pipe")
    found = scan_images(str(tmp_path))
    assert [os.path.basename(p) for p in found] == ["IM000001"]
    np.testing.assert_array_equal(load_image(found[0]), read_dicom(src))
    assert is_image_file("x.dcm") and not is_image_file(tmp_path / "series" / "IM000001")  # by name
    listed = image_extensions()
    assert all(ext in listed for ext in (".png", ".dcm", ".nii.gz", "DICM preamble"))


def test_a_12_bit_png_from_a_real_ct_is_warned_about_and_read_with_bits_12(tmp_path, monkeypatch):
    """Issue 28 item 1: 12-bit values in a 16-bit PNG (X-ray / CT exports) were divided by 257
    and trained at 0-16 of 255 without a word. Now a warning names the file once, and a source's
    ``bits: 12`` maps 0-4095 onto 0-255."""
    from PIL import Image

    import midol.data.image_io as image_io
    from midol.data.corpus import Corpus
    from midol.data.image_io import IntensityWarning
    from midol.data.sources import DataSource

    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "CT_small.dcm"))
    raw = ds.pixel_array.astype(np.int64)
    twelve = np.clip(raw - raw.min(), 0, 4095).astype(np.uint16)
    assert 255 < twelve.max() < 4096
    (tmp_path / "ct").mkdir()
    path = tmp_path / "ct" / "slice.png"
    Image.fromarray(twelve).save(path)
    monkeypatch.setattr(image_io, "_FEW_BITS_WARNED", False)
    with pytest.warns(IntensityWarning, match=r"slice.png: a 16-bit image whose values stay below 4096"):
        dark = load_image(path)
    assert dark.max() <= 16
    corpus = Corpus([DataSource(str(tmp_path / "ct"), "ct", bits=12)])
    bright = corpus.load(0)
    np.testing.assert_array_equal(bright[..., 0], np.rint(twelve * (255 / 4095)).astype(np.uint8))
    with pytest.raises(ValueError, match="bits must be between 8 and 16"):
        DataSource(str(tmp_path / "ct"), "ct", bits=20)
