"""Folder, CSV and npz sources on the sample corpus (and MedMNIST from the shared folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from midol.data.readers import ImageList
from midol.data.sources import DataSource, resolve_source


@pytest.mark.parametrize(("folder", "count"), [("xray", 60), ("pathology", 41), ("oct", 16)])
def test_folder_counts(sample_data: Path, folder: str, count: int) -> None:
    src = resolve_source(DataSource(str(sample_data / folder), modality=folder))
    assert isinstance(src, ImageList) and src.paths is not None and len(src) == count
    assert src.load(0).shape[2] == 3


def test_folder_recursion_and_non_images(sample_data: Path) -> None:
    # Whole corpus: 117 image files; the npz, csv, md and py files are not images.
    assert len(resolve_source(DataSource(str(sample_data), "mixed"))) == 117
    with pytest.raises(ValueError, match=r"no image file found"):
        resolve_source(DataSource(str(sample_data / "xray"), "xray", recursive=False))
    flat = resolve_source(DataSource(str(sample_data / "xray" / "NORMAL"), "xray", recursive=False))
    assert len(flat) == 30


def test_folder_order_is_sorted_and_skips_dotfiles(sample_data: Path, tmp_path: Path) -> None:
    for name in ("b.png", "a.png", ".hidden.png"):
        shutil.copy(sample_data / "oct" / "CNV" / "CNV-53018-2.png", tmp_path / name)
    src = resolve_source(DataSource(str(tmp_path), "oct"))
    assert [Path(p).name for p in src.paths] == ["a.png", "b.png"]


def test_csv_source(sample_data: Path, tmp_path: Path) -> None:
    src = resolve_source(DataSource(str(sample_data / "labels.csv"), "mixed"))
    assert len(src) == 117 and all(Path(src.describe(i)).is_file() for i in range(len(src)))
    # Relative paths under another root, custom column name
    csv = tmp_path / "list.csv"
    csv.write_text("file,label\nCNV/CNV-53018-2.png,CNV\nDME/DME-30521-1.png,DME\n\n")
    src = resolve_source(
        DataSource(str(csv), "oct", path_column="file", root=str(sample_data / "oct"))
    )
    assert len(src) == 2 and src.load(1).shape == (124, 128, 3)


def test_npz_source(sample_data: Path) -> None:
    src = resolve_source(DataSource(str(sample_data / "fundus_retinamnist.npz"), "fundus"))
    assert isinstance(src, ImageList) and src.paths is None and len(src) == 200
    img = src.load(5)
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert src.describe(5).endswith("fundus_retinamnist.npz#train[5]")


def test_npz_grayscale_multi_split(shared_data: Path) -> None:
    path = str(shared_data / "medmnist" / "pneumoniamnist.npz")
    src = resolve_source(DataSource(path, "xray", splits=["train", "val"]))
    assert len(src) == 4708 + 524
    assert src.load(4708).shape == (28, 28, 3)
    assert src.describe(4708).endswith("#val[0]")


def test_auto_kind(sample_data: Path, tmp_path: Path) -> None:
    assert DataSource(str(sample_data / "xray"), "x").resolved_kind() == "folder"
    assert DataSource(str(sample_data / "labels.csv"), "x").resolved_kind() == "csv"
    assert DataSource(str(sample_data / "fundus_retinamnist.npz"), "x").resolved_kind() == "npz"
    with pytest.raises(ValueError, match=r"set kind explicitly"):
        DataSource(str(sample_data / "ATTRIBUTION.md"), "x").resolved_kind()


def test_clear_errors(sample_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*modality 'oct'"):
        resolve_source(DataSource(str(tmp_path / "nowhere"), "oct"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty.*no image file found"):
        resolve_source(DataSource(str(empty), "oct"))
    with pytest.raises(
        ValueError, match=r"labels.csv.*no column 'filename'.*path, modality, label"
    ):
        resolve_source(DataSource(str(sample_data / "labels.csv"), "x", path_column="filename"))
    with pytest.raises(ValueError, match=r"no array 'val_images'.*splits present: train"):
        resolve_source(DataSource(str(sample_data / "fundus_retinamnist.npz"), "f", splits=["val"]))
    for weight in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"weight must be > 0"):
            DataSource(str(sample_data / "xray"), "xray", weight=weight)
