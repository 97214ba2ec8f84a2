"""Labelled datamodules on real images: folders, CSV manifests, MedMNIST npz, image/mask pairs,
seeded splits, and the errors users meet (bad labels, wrong mask sizes, empty or missing data)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol.data import (
    LabelledDataModule,
    LabelledSource,
    SegmentationDataModule,
    SegmentationSource,
)
from midol.data.splits import seeded_split
from tests.helpers.task_data import pathology_pairs, write_csv


def test_seeded_split_is_deterministic_disjoint_and_stratified():
    strata = np.array([0] * 50 + [1] * 30 + [2] * 1)
    a = seeded_split(len(strata), [0.2, 0.1], seed=3, strata=strata)
    b = seeded_split(len(strata), [0.2, 0.1], seed=3, strata=strata)
    c = seeded_split(len(strata), [0.2, 0.1], seed=4, strata=strata)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert sorted(np.concatenate(a).tolist()) == list(range(len(strata)))
    train, val, test = a
    assert np.bincount(strata[val], minlength=3).tolist() == [10, 6, 0]
    assert np.bincount(strata[test], minlength=3).tolist() == [5, 3, 0]
    assert 80 in train  # the single-item class stays in training
    with pytest.raises(ValueError, match="sum to < 1"):
        seeded_split(10, [0.5, 0.5], seed=0)


def test_class_per_folder_with_seeded_split(sample_data: Path):
    dm = LabelledDataModule(
        train=LabelledSource(str(sample_data / "xray")), val_fraction=0.2, test_fraction=0.2,
        image_size=32, batch_size=4, num_workers=0,
    )
    dm.setup("fit")
    assert dm.classes == ["NORMAL", "PNEUMONIA"] and dm.num_classes == 2
    assert dm.split_sizes() == {"train": 36, "val": 12, "test": 12}
    val_targets = dm.splits["val"].targets
    assert np.bincount(val_targets).tolist() == [6, 6]
    train_paths = set(dm.splits["train"].images.paths)
    assert not train_paths & set(dm.splits["val"].images.paths)
    item = dm.datasets["val"][0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    path = dm.splits["val"].images.paths[0]
    assert Path(path).parent.name == dm.classes[int(item["target"])]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["target"].dtype == torch.int64


def test_csv_manifest_with_split_column_and_class_names(sample_data: Path, tmp_path: Path):
    rows = list(csv.DictReader(open(sample_data / "labels.csv")))
    oct_rows = [r for r in rows if r["modality"] == "oct"]
    manifest = write_csv(
        tmp_path / "oct.csv", ["file", "diagnosis", "split"],
        [[str(sample_data / r["path"]), r["label"], "test" if i % 4 == 0 else "train"]
         for i, r in enumerate(oct_rows)],
    )
    dm = LabelledDataModule(
        train=LabelledSource(str(manifest), split="train", path_column="file", label_columns=["diagnosis"]),
        test=LabelledSource(str(manifest), split="test", path_column="file", label_columns=["diagnosis"]),
        image_size=32, batch_size=2, num_workers=0,
    )
    dm.setup("fit")
    assert dm.classes == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert dm.split_sizes() == {"train": 12, "test": 4}
    assert dm.val_dataloader() == []  # no validation split asked for
    expected = [dm.classes.index(r["label"]) for i, r in enumerate(oct_rows) if i % 4 == 0]
    assert dm.splits["test"].targets.tolist() == expected


def test_medmnist_npz_official_splits(sample_data: Path, tmp_path: Path):
    with np.load(sample_data / "fundus_retinamnist.npz") as z:
        images, labels = z["train_images"], z["train_labels"]
    npz = tmp_path / "retina.npz"
    np.savez(npz, train_images=images[:120], train_labels=labels[:120],
             val_images=images[120:160], val_labels=labels[120:160],
             test_images=images[160:], test_labels=labels[160:])
    dm = LabelledDataModule(
        train=LabelledSource(str(npz), split="train"), val=LabelledSource(str(npz), split="val"),
        test=LabelledSource(str(npz), split="test"), num_classes=5, image_size=32, batch_size=8,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 120, "val": 40, "test": 40}
    assert dm.splits["test"].targets.tolist() == labels[160:, 0].tolist()
    assert dm.splits["val"].images.describe(3).endswith("retina.npz#val[3]")


def test_medmnist_shared_official_split_sizes(shared_data: Path):
    npz = shared_data / "medmnist" / "pneumoniamnist.npz"
    dm = LabelledDataModule(
        train=LabelledSource(str(npz), split="train"), val=LabelledSource(str(npz), split="val"),
        test=LabelledSource(str(npz), split="test"), image_size=32, num_workers=0,
    )
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 4708, "val": 524, "test": 624}
    assert dm.num_classes == 2
    assert dm.datasets["test"][0]["image"].shape == (3, 32, 32)


def test_multilabel_csv_and_uncertain_labels(sample_data: Path, tmp_path: Path):
    paths = sorted((sample_data / "xray" / "PNEUMONIA").glob("*.png"))[:4]
    manifest = write_csv(tmp_path / "ml.csv", ["path", "a", "b"],
                         [[str(p), "1", v] for p, v in zip(paths, ["0", "1", "-1", ""])])
    source = LabelledSource(str(manifest), label_columns=["a", "b"])
    with pytest.raises(ValueError, match="uncertain_label"):
        LabelledDataModule(train=source, task="multilabel", num_workers=0).setup("fit")
    dm = LabelledDataModule(train=source, task="multilabel", uncertain_label="one", num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == ["a", "b"]
    assert dm.splits["train"].targets.tolist() == [[1, 0], [1, 1], [1, 1], [1, 1]]


def test_label_outside_class_range_names_the_item(sample_data: Path, tmp_path: Path):
    with np.load(sample_data / "fundus_retinamnist.npz") as z:
        images, labels = z["train_images"][:20], z["train_labels"][:20].copy()
    labels[7, 0] = 5
    npz = tmp_path / "bad.npz"
    np.savez(npz, train_images=images, train_labels=labels)
    dm = LabelledDataModule(train=LabelledSource(str(npz)), num_classes=5, num_workers=0)
    with pytest.raises(ValueError, match=r"bad.npz#train\[7\]: label 5 outside the class range \[0, 5\)"):
        dm.setup("fit")
    manifest = write_csv(tmp_path / "names.csv", ["path", "label"],
                         [[str(p), "NORMAL"] for p in sorted((sample_data / "xray/NORMAL").glob("*"))[:3]]
                         + [[str(sorted((sample_data / "xray/NORMAL").glob("*"))[3]), "TYPO"]])
    dm = LabelledDataModule(train=LabelledSource(str(manifest)), classes=["NORMAL", "PNEUMONIA"], num_workers=0)
    with pytest.raises(ValueError, match="label 'TYPO' is not one of the classes"):
        dm.setup("fit")


def test_empty_folder_and_missing_paths_are_clear_errors(sample_data: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        LabelledDataModule(train=LabelledSource(str(tmp_path / "empty")), num_workers=0).setup("fit")
    (tmp_path / "tree" / "A").mkdir(parents=True)
    (tmp_path / "tree" / "B").mkdir()
    shutil.copy(next((sample_data / "xray/NORMAL").glob("*.png")), tmp_path / "tree/A/x.png")
    with pytest.raises(ValueError, match="empty class folder"):
        LabelledDataModule(train=LabelledSource(str(tmp_path / "tree")), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LabelledDataModule(train=LabelledSource(str(tmp_path / "nowhere"))).setup("fit")
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"],
                         [[str(tmp_path / "tree/A/x.png"), "A"], ["gone.png", "B"]])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        LabelledDataModule(train=LabelledSource(str(manifest)), num_workers=0).setup("fit")


def test_segmentation_folder_pairs_masks_and_region(sample_data: Path, tmp_path: Path):
    root = pathology_pairs(sample_data, tmp_path / "seg")
    dm = SegmentationDataModule(
        train=SegmentationSource(str(root), mask_suffix="_mask"), val_fraction=0.34,
        image_size=32, batch_size=2, num_workers=0,
    )
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 4, "val": 2}
    image, mask = dm.datasets["val"].load_pair(0)
    gray = np.asarray(Image.open(dm.tables["val"].images[0]).convert("L"))
    assert mask.shape == gray.shape and np.array_equal(mask, (gray < 200).astype(np.uint8))
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 32, 32) and item["target"].shape == (32, 32)
    assert set(item["target"].unique().tolist()) <= {0, 1}

    # A region mask (as DRIVE's field of view) turns pixels outside it into ignore_index.
    region = tmp_path / "region.png"
    Image.fromarray(np.pad(np.full((56, 56), 255, np.uint8), 28)).save(region)
    manifest = write_csv(tmp_path / "pairs.csv", ["image", "mask", "fov"],
                         [[p, m, str(region)] for p, m in zip(dm.tables["val"].images, dm.tables["val"].masks)])
    dm2 = SegmentationDataModule(train=SegmentationSource(str(manifest), region_column="fov"),
                                 image_size=32, num_workers=0, batch_size=2)
    dm2.setup("fit")
    _, mask2 = dm2.datasets["train"].load_pair(0)
    assert (mask2[:28] == 255).all() and np.array_equal(mask2[28:84, 28:84], mask[28:84, 28:84])


def test_segmentation_errors_name_the_files(sample_data: Path, tmp_path: Path):
    root = pathology_pairs(sample_data, tmp_path / "seg", n=2)
    mask = sorted((root / "masks").glob("*.png"))[0]
    original = mask.read_bytes()
    Image.open(mask).resize((50, 40)).save(mask)
    with pytest.raises(ValueError, match=rf"mask .*{mask.name} is 50x40 \(WxH\) but its image"):
        SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"), num_workers=0).setup("fit")
    mask.write_bytes(original)
    with pytest.raises(FileNotFoundError, match="no mask"):
        SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_lesion"), num_workers=0).setup("fit")
    # An index mask with a class id the model does not have.
    image = sorted((root / "images").glob("*.jpg"))[1]
    mask = root / "masks" / f"{image.stem}_mask.png"
    Image.fromarray(np.full(Image.open(image).size[::-1], 3, np.uint8)).save(mask)
    dm = SegmentationDataModule(train=SegmentationSource(str(root), mask_suffix="_mask"),
                                mask_mode="index", num_classes=3, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"{mask.name}: class id 3 outside the class range \[0, 3\)"):
        dm.datasets["train"].load_pair(dm.tables["train"].images.index(str(image)))


def test_drive_pairs_with_field_of_view(shared_data: Path):
    drive = shared_data / "fundus" / "drive_vessel_seg" / "pairs.csv"
    dm = SegmentationDataModule(
        train=SegmentationSource(str(drive), region_column="fov_mask", split="training"),
        test=SegmentationSource(str(drive), region_column="fov_mask", split="test"),
        val_fraction=0.2, image_size=64, num_workers=0, batch_size=2,
    )
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 16, "val": 4, "test": 20}
    _, mask = dm.datasets["test"].load_pair(0)
    assert mask.shape == (584, 565) and set(np.unique(mask).tolist()) == {0, 1, 255}
    vessel_fraction = (mask == 1).sum() / (mask != 255).sum()
    assert 0.05 < vessel_fraction < 0.2  # DRIVE vessels cover ~12 % of the field of view
