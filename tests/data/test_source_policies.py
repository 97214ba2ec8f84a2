"""Issue 28 items 1 and 3: a source's intensity, window, slice and grouping options, on real
files only (pydicom's and nibabel's shipped test data, a 12-bit PNG written from a real CT's
pixels, the bundled sample images), checked against numpy restatements of the rules."""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

import midol.data.medical_io as medical_io  # noqa: E402  (after the importorskip of the optional readers)
from midol.data.corpus import Corpus  # noqa: E402
from midol.data.sampler import WeightedSourceSampler  # noqa: E402
from midol.data.sources import DataSource, resolve_source, source_table  # noqa: E402
from tests.helpers.paths import SAMPLE_DATA  # noqa: E402

DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
DICOMDIR_TESTS = os.path.join(DICOM_DIR, "dicomdirtests")  # 31 real CR / CT / MR files, 2 patients
NIFTI_DIR = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")


def window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2, without the half-pixel offsets), restated."""
    lo, hi = centre - width / 2, centre + width / 2
    return np.rint((np.clip(values, lo, hi) - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.rint((values - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def hounsfield(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture()
def volume_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A folder holding nibabel's real MR volume, and its voxels as get_fdata gives them."""
    shutil.copy(os.path.join(NIFTI_DIR, "anatomical.nii"), tmp_path / "anatomical.nii")
    data = np.asarray(nibabel.load(tmp_path / "anatomical.nii").get_fdata(dtype=np.float32)).astype(np.float64)
    assert data.ndim == 3
    return tmp_path, data


def test_a_volume_sliced_middle_all_stride_and_stack(volume_folder, monkeypatch) -> None:
    folder, data = volume_folder
    n = data.shape[2]
    middle = Corpus([DataSource(str(folder), "mr")])
    assert len(middle) == 1
    np.testing.assert_array_equal(middle.load(0)[..., 0], minmax(data[:, :, n // 2]))

    # the scan reads headers only: no voxel reader may run while the items are listed
    def no_voxels(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxels read at scan time")

    with monkeypatch.context() as m:
        m.setattr(medical_io, "read_nifti", no_voxels)
        m.setattr(medical_io, "read_dicom", no_voxels)
        every = resolve_source(DataSource(str(folder), "mr", slices="all"))
        strided = resolve_source(DataSource(str(folder), "mr", slices={"stride": 4}))
        stacked = resolve_source(DataSource(str(folder), "mr", slices={"stack": 3}))
    assert len(every) == n and len(stacked) == n
    assert [strided.frame(i) for i in range(len(strided))] == list(range(0, n, 4))
    for k in (0, 3, n - 1):
        np.testing.assert_array_equal(every.load(k)[..., 1], minmax(data[:, :, k]))
    assert every.describe(3).endswith("anatomical.nii#slice=3")
    np.testing.assert_array_equal(strided.load(2)[..., 2], minmax(data[:, :, 8]))
    for k in (0, n // 2, n - 1):  # neighbours as channels, one min-max over the three
        picks = [max(k - 1, 0), k, min(k + 1, n - 1)]
        expected = minmax(np.stack([data[:, :, j] for j in picks], axis=-1))
        np.testing.assert_array_equal(stacked.load(k), expected)
    assert not np.array_equal(stacked.load(n // 2)[..., 0], stacked.load(n // 2)[..., 2])


def test_a_4d_series_is_sliced_in_its_first_volume(tmp_path: Path) -> None:
    shutil.copy(os.path.join(NIFTI_DIR, "example4d.nii.gz"), tmp_path / "example4d.nii.gz")
    data = np.asarray(nibabel.load(tmp_path / "example4d.nii.gz").get_fdata(dtype=np.float32)).astype(np.float64)
    assert data.ndim == 4
    items = resolve_source(DataSource(str(tmp_path), "fmri", slices="all"))
    assert len(items) == data.shape[2]
    for k in range(data.shape[2]):
        np.testing.assert_array_equal(items.load(k)[..., 0], minmax(data[:, :, k, 0]))


def test_a_multi_frame_dicom_gives_one_item_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "rtdose.dcm"
    shutil.copy(os.path.join(DICOM_DIR, "rtdose.dcm"), path)
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float64)  # 15 real dose planes of 10 x 10, no window
    assert frames.shape == (15, 10, 10) and ds.get("WindowCenter") is None
    items = resolve_source(DataSource(str(tmp_path), "dose", slices="all"))
    assert len(items) == 15
    for k in (0, 7, 14):
        np.testing.assert_array_equal(items.load(k)[..., 0], minmax(frames[k]))
    # the default (middle) is the middle frame, and a stack holds the frames around it
    np.testing.assert_array_equal(Corpus([DataSource(str(tmp_path), "dose")]).load(0)[..., 0], minmax(frames[7]))
    stacked = resolve_source(DataSource(str(tmp_path), "dose", slices={"stack": 3, "stride": 7}))
    assert [stacked.frame(i) for i in range(len(stacked))] == [0, 7, 14]
    np.testing.assert_array_equal(stacked.load(2), minmax(np.stack([frames[13], frames[14], frames[14]], axis=-1)))


def test_three_windows_become_the_rgb_channels_of_a_ct(tmp_path: Path) -> None:
    """CT lung, mediastinum and bone windows on the Hounsfield values of a real CT."""
    shutil.copy(os.path.join(DICOM_DIR, "CT_small.dcm"), tmp_path / "ct.dcm")
    hu = hounsfield(str(tmp_path / "ct.dcm"))
    windows = [[-600, 1500], [40, 400], [400, 1800]]
    image = Corpus([DataSource(str(tmp_path), "ct", window=windows)]).load(0)
    for c, (centre, width) in enumerate(windows):
        np.testing.assert_array_equal(image[..., c], window(hu, centre, width))
    assert len({image[..., c].tobytes() for c in range(3)}) == 3
    one = Corpus([DataSource(str(tmp_path), "ct", window=[40, 400])]).load(0)
    np.testing.assert_array_equal(one[..., 2], window(hu, 40, 400))


def test_a_window_on_a_nifti_volume_and_minmax_against_an_mr_files_window(volume_folder, tmp_path) -> None:
    folder, data = volume_folder
    image = Corpus([DataSource(str(folder), "mr", window=[300, 400])]).load(0)
    np.testing.assert_array_equal(image[..., 0], window(data[:, :, data.shape[2] // 2], 300, 400))
    mr = tmp_path / "mr"
    mr.mkdir()
    shutil.copy(os.path.join(DICOM_DIR, "MR_small.dcm"), mr / "mr.dcm")
    ds = pydicom.dcmread(mr / "mr.dcm")
    values = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    auto = Corpus([DataSource(str(mr), "mr")]).load(0)[..., 0]
    stretched = Corpus([DataSource(str(mr), "mr", intensity="minmax")]).load(0)[..., 0]
    np.testing.assert_array_equal(stretched, minmax(values))  # the file's own window ignored
    if ds.get("WindowCenter") is not None:
        assert not np.array_equal(auto, stretched)


def test_monochrome1_windows_are_inverted(tmp_path: Path) -> None:
    """A real MONOCHROME1 CR (bright = low values): every window channel is inverted."""
    cr = os.path.join(DICOMDIR_TESTS, "77654033", "CR1", "6154")
    ds = pydicom.dcmread(cr)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    shutil.copy(cr, tmp_path / "6154")
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0)
    windows = [[1600, 2800], [1000, 1000], [2500, 1000]]
    image = Corpus([DataSource(str(tmp_path), "cr", window=windows)]).load(0)
    for c, (centre, width) in enumerate(windows):
        np.testing.assert_array_equal(image[..., c], 255 - window(values, centre, width))


def test_a_12_bit_png_from_a_real_ct_under_each_intensity_rule(tmp_path: Path) -> None:
    from PIL import Image

    raw = pydicom.dcmread(os.path.join(DICOM_DIR, "CT_small.dcm")).pixel_array.astype(np.int64)
    twelve = np.clip(raw - raw.min(), 0, 4095).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "slice.png")
    bits = Corpus([DataSource(str(tmp_path), "ct", bits=12)]).load(0)[..., 0]
    np.testing.assert_array_equal(bits, np.rint(twelve * (255 / 4095)).astype(np.uint8))
    stretched = Corpus([DataSource(str(tmp_path), "ct", intensity="minmax")]).load(0)[..., 0]
    np.testing.assert_array_equal(stretched, minmax(twelve.astype(np.float64)))
    assert stretched.max() == 255 and bits.max() < 255  # minmax uses the image's own range
    with pytest.raises(ValueError, match=r"window applies to DICOM / NIfTI values, but .*slice.png is a raster"):
        resolve_source(DataSource(str(tmp_path), "ct", window=[40, 400]))


@pytest.mark.parametrize("options, message", [
    ({"window": [40, 400], "bits": 12}, "bits applies to 16-bit PNG / TIFF files and window"),
    ({"window": [40, 400], "intensity": "minmax"}, "intensity: minmax sets the mapping itself"),
    ({"intensity": "gamma"}, "intensity must be auto or minmax"),
    ({"window": [[40, 400], [0, 100]]}, r"give one window \(grey\) or three"),
    ({"window": [40, 0]}, "window width must be > 0"),
    ({"window": [40, 400, 3]}, r"window must be \[centre, width\]"),
    ({"slices": "every"}, "slices must be middle, all"),
    ({"slices": {"stride": 0}}, "slices stride must be an integer >= 1"),
    ({"slices": {"stack": 5}}, "slices stack must be 1 or 3"),
    ({"slices": {"stack": 3}, "window": [[0, 1], [0, 2], [0, 3]]}, "stack: 3 and three windows"),
    ({"group_by": " "}, "group_by is empty"),
])
def test_bad_options_are_refused_in_one_line_naming_the_source(options, message) -> None:
    with pytest.raises(ValueError, match=rf"data source 'x' \(modality 'ct'\): {message}"):
        DataSource("x", "ct", **options)


def test_file_only_options_on_npz_and_groups_that_cannot_be_read(tmp_path: Path) -> None:
    npz = str(SAMPLE_DATA / "fundus_retinamnist.npz")
    with pytest.raises(ValueError, match="an npz holds 8-bit images"):
        resolve_source(DataSource(npz, "fundus", slices="all"))
    with pytest.raises(ValueError, match=r"oct/.*is not DICOM \(group_by: patient reads DICOM PatientID\)"):
        resolve_source(DataSource(str(SAMPLE_DATA / "oct"), "oct", group_by="patient"))
    with pytest.raises(ValueError, match="group_by must be series, patient or a column of a CSV source"):
        resolve_source(DataSource(str(SAMPLE_DATA / "oct"), "oct", group_by="eye"))


def test_dicom_series_and_patients_are_read_from_the_headers() -> None:
    """pydicom's dicomdirtests: 31 real CR / CT / MR files of 2 patients in 13 series."""
    include = ["7*/*", "9*/*"]
    by_file = {}
    for root, _, files in os.walk(DICOMDIR_TESTS):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), DICOMDIR_TESTS)
            if rel.startswith(("7", "9")):
                ds = pydicom.dcmread(os.path.join(root, f), stop_before_pixels=True)
                by_file[os.path.join(root, f)] = (ds.PatientID, ds.SeriesInstanceUID)
    patients = DataSource(DICOMDIR_TESTS, "mixed", include=include, group_by="patient")
    series = DataSource(DICOMDIR_TESTS, "mixed", include=include, group_by="series")
    corpus = Corpus([patients, series])
    n = len(by_file)
    assert len(corpus) == 2 * n
    expected = [len({p for p, _ in by_file.values()}), len({s for _, s in by_file.values()})]
    assert corpus.group_counts == expected == [2, 13]
    lst = corpus.sources[0]
    keys = lst.group_keys()
    assert keys == [by_file[lst.describe(i)][0] for i in range(len(lst))]
    table = source_table([patients, series], [n, n], corpus.group_counts)
    assert f"| {n} | 1 | {2 / 15:.1%} | 2 (patient) |" in table
    assert f"| | mixed | | {2 * n} | | 100.0% | 15 |" in table
    # each patient of the first source gets half of its draws, whatever its image count
    sampler = WeightedSourceSampler(corpus.source_ids, [1.0, 1.0], num_samples=20_000, seed=0,
                                    group_ids=corpus.group_ids)
    counts = Counter(int(corpus.group_ids[i]) for i in sampler if int(corpus.source_ids[i]) == 0)
    drawn = sum(counts.values())
    assert abs(drawn / 20_000 - 2 / 15) < 4 * math.sqrt((2 / 15) * (13 / 15) / 20_000)
    for g in (0, 1):
        assert abs(counts[g] / drawn - 0.5) < 4 * math.sqrt(0.25 / drawn)


def _patients_csv(tmp_path: Path, sizes: dict[str, int]) -> Path:
    """A CSV listing distinct real sample images, ``sizes[patient]`` of them per patient."""
    images = [p for folder in ("xray", "pathology", "oct")
              for p in resolve_source(DataSource(str(SAMPLE_DATA / folder), folder)).paths or []]
    assert len(images) >= sum(sizes.values())
    path = tmp_path / "patients.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "patient_id"])
        k = 0
        for patient, n in sizes.items():
            for _ in range(n):
                out.writerow([images[k], patient])
                k += 1
    return path


def test_equal_numbers_of_patients_get_equal_shares_whatever_their_image_counts(tmp_path: Path) -> None:
    """3 patients with 1, 10 and 100 real images: grouped by patient each gets a third of
    30,000 draws (within 4 binomial standard deviations); ungrouped, 1/111, 10/111, 100/111."""
    sizes = {"A": 1, "B": 10, "C": 100}
    path = _patients_csv(tmp_path, sizes)
    draws = 30_000
    grouped = Corpus([DataSource(str(path), "mixed", group_by="patient_id")])
    assert grouped.group_counts == [3]
    patient_of = {grouped.describe(i): p for i, p in enumerate(grouped.sources[0].group_keys() or [])}
    for group_ids, expected in ((grouped.group_ids, {p: 1 / 3 for p in sizes}),
                                (None, {p: n / 111 for p, n in sizes.items()})):
        sampler = WeightedSourceSampler(grouped.source_ids, [1.0], num_samples=draws, seed=1,
                                        group_ids=group_ids)
        counts = Counter(patient_of[grouped.describe(i)] for i in sampler)
        for p, share in expected.items():
            tol = 4 * math.sqrt(share * (1 - share) / draws)
            assert abs(counts[p] / draws - share) < tol, (p, counts[p] / draws, share)
    # beside an ungrouped source of 10 images at the same weight: 3 draw units against 10
    other = DataSource(str(SAMPLE_DATA / "oct"), "oct")
    mixed = Corpus([DataSource(str(path), "mixed", group_by="patient_id"), other])
    sampler = WeightedSourceSampler(mixed.source_ids, [1.0, 1.0], seed=0, group_ids=mixed.group_ids)
    n_oct = len(mixed.sources[1])
    assert sampler.expected_shares() == pytest.approx([3 / (3 + n_oct), n_oct / (3 + n_oct)])


def test_sampler_groups_keep_the_permutation_and_refuse_cross_source_groups() -> None:
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    pairs = torch.tensor([0, 0, 1, 1, 2, 2])  # every group of 2 items: weights stay equal
    sampler = WeightedSourceSampler(ids, [1.0, 1.0], seed=5, group_ids=pairs)
    assert sorted(sampler) == list(range(6))  # a permutation, as without groups
    assert list(sampler) == list(WeightedSourceSampler(ids, [1.0, 1.0], seed=5))
    with pytest.raises(ValueError, match="a group spans two sources"):
        WeightedSourceSampler(ids, [1.0, 1.0], group_ids=torch.tensor([0, 0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="group_ids must be 6 ids"):
        WeightedSourceSampler(ids, [1.0, 1.0], group_ids=torch.tensor([0, 1]))


def test_the_options_parse_from_a_yaml_config() -> None:
    """As a user writes them in data.sources (LightningCLI's parser, jsonargparse)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--sources", type=list[DataSource])
    cfg = parser.parse_string(
        "sources:\n"
        "  - {path: ct, modality: ct, window: [[-600, 1500], [40, 400], [400, 1800]], group_by: series}\n"
        "  - {path: mr, modality: mr, window: [300, 400], slices: {stack: 3, stride: 2}}\n"
        "  - {path: xr, modality: xray, intensity: minmax, slices: all, group_by: patient_id}\n")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    ct, mr, xr = instantiate(cfg).sources
    assert ct.read_options().windows == ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))
    assert ct.slice_policy() == (None, 1) and ct.group_by == "series"
    assert mr.read_options().windows == ((300.0, 400.0),) and mr.slice_policy() == (2, 3)
    assert xr.read_options().minmax and xr.slice_policy() == (1, 1) and xr.group_by == "patient_id"


def test_a_volume_whose_header_is_cut_stays_one_item_and_is_warned_about(volume_folder) -> None:
    """A truncated copy of the real volume beside it: the scan warns and lists it once (its
    load fails like any unreadable image), the intact volume is still sliced."""
    from midol.errors import UnreadableImageError

    folder, data = volume_folder
    (folder / "cut.nii").write_bytes((folder / "anatomical.nii").read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"1 DICOM / NIfTI header\(s\) could not be read; .*cut.nii"):
        items = resolve_source(DataSource(str(folder), "mr", slices="all", group_by="series"))
    assert len(items) == data.shape[2] + 1
    assert items.describe(0).endswith("anatomical.nii#slice=0") and items.describe(len(items) - 1).endswith("cut.nii")
    assert len(set(items.group_keys() or [])) == 2
    with pytest.raises(UnreadableImageError, match="cut.nii"):
        items.load(len(items) - 1)


def test_the_datamodule_prints_groups_and_samples_per_group(tmp_path: Path, caplog) -> None:
    import logging

    from midol.data.pretrain import PretrainDataModule
    from midol.data.transforms.single_view import SingleViewTransform

    path = _patients_csv(tmp_path, {"A": 1, "B": 10, "C": 100})
    oct_ = DataSource(str(SAMPLE_DATA / "oct"), "oct")
    dm = PretrainDataModule(sources=[DataSource(str(path), "mixed", group_by="patient_id"), oct_],
                            transform=SingleViewTransform(size=32), batch_size=4, num_workers=0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        dm.setup("fit")
    n_oct = len(resolve_source(oct_))
    share = 3 / (3 + n_oct)
    assert any(f"| mixed | csv | 111 | 1 | {share:.1%} | 3 (patient_id) |" in r.getMessage()
               for r in caplog.records)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, WeightedSourceSampler)
    assert sampler.expected_shares() == pytest.approx([share, 1 - share])


def test_an_expanded_volume_is_one_draw_unit_unless_told_otherwise(volume_folder, tmp_path) -> None:
    """Two real volumes (the MR and a copy) and one 2-D image: with ``slices: all`` each volume is
    one group by default, so each of the three files gets a third of the draws; ``group_by: item``
    makes every slice its own draw unit again."""
    folder, data = volume_folder
    n = data.shape[2]
    shutil.copy(folder / "anatomical.nii", folder / "copy.nii")
    png = next(p for p in sorted(Path(SAMPLE_DATA).rglob("*.png")))
    shutil.copy(png, folder / "flat.png")
    grouped = Corpus([DataSource(str(folder), "mr", slices="all")])
    assert len(grouped) == 2 * n + 1 and grouped.group_counts == [3]
    counts = Counter(grouped.group_ids.tolist())
    assert sorted(counts.values()) == [1, n, n]
    draws = torch.tensor(list(WeightedSourceSampler(grouped.source_ids, [1.0], num_samples=30000,
                                                    seed=0, group_ids=grouped.group_ids)))
    shares = np.bincount(grouped.group_ids[draws].numpy(), minlength=3) / len(draws)
    assert np.all(np.abs(shares - 1 / 3) < 4 * math.sqrt(2 / 9 / len(draws)))
    table = source_table([DataSource(str(folder), "mr", slices="all")], [len(grouped)], grouped.group_counts)
    assert f"| {2 * n + 1} | 1 | 100.0% | 3 (volume) |" in table
    items = Corpus([DataSource(str(folder), "mr", slices="all", group_by="item")])
    assert items.group_counts == [2 * n + 1]
