"""Patient manifests (MedMIX): inputs of three kinds, presence masks, training-only vocabularies,
labels and splits, and the patient datamodule on real ODIR patients."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol.data.image_io import UnreadableImageWarning
from midol.data.patient_datamodule import PatientDataModule, PatientDataset, UnreadablePatientError
from midol.data.patients import InputSpec, read_patient_table
from midol.models.fusion import MISSING_CODE
from tests.helpers.paths import SHARED_DATA
from tests.helpers.task_data import write_csv

ODIR = SHARED_DATA / "fundus" / "odir_patients"
ODIR_LABELS = ["N", "D", "G", "C", "A", "H", "M", "O"]
ODIR_INPUTS = [
    {"name": "left", "kind": "image", "column": "left_image", "modality": "fundus"},
    {"name": "right", "kind": "image", "column": "right_image", "modality": "fundus"},
    {"name": "demographics", "kind": "tabular", "numeric": ["age"], "categorical": ["sex"]},
]
needs_odir = pytest.mark.skipif(not (ODIR / "patients.csv").is_file(),
                                reason=f"ODIR patients not found at {ODIR}")


def png(path: Path, value: int = 100, size: tuple[int, int] = (12, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path.name


TAB = [{"name": "tab", "kind": "tabular", "numeric": ["age", "bmi"], "categorical": ["site"]}]


def tab_csv(tmp_path: Path, rows: list[list[object]]) -> Path:
    """id, age, bmi, site, y, split"""
    return write_csv(tmp_path / "tab.csv", ["patient_id", "age", "bmi", "site", "y", "split"], rows)


# ------------------------------------------------------------------------------ real manifest
@needs_odir
def test_odir_manifest_presence_labels_splits_and_demographics():
    with open(ODIR / "patients.csv", newline="") as fh:
        raw = list(csv.DictReader(fh))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every listed file exists, no unseen category
        table = read_patient_table(str(ODIR / "patients.csv"), ODIR_INPUTS, ODIR_LABELS)
    n = len(raw)
    assert len(table) == n == 1600
    assert table.task == "multilabel" and table.label_names == ODIR_LABELS
    assert table.patient_ids == [r["patient_id"] for r in raw]
    assert table.input_names == ["left", "right", "demographics"]
    left = np.array([bool(r["left_image"].strip()) for r in raw])
    right = np.array([bool(r["right_image"].strip()) for r in raw])
    assert np.array_equal(table.present[:, 0], left)
    assert np.array_equal(table.present[:, 1], right)
    one_eyed = left != right
    assert int(one_eyed.sum()) == 200
    assert np.array_equal(table.present[:, :2].sum(axis=1) == 1, one_eyed)
    assert table.present[:, 2].all()
    assert table.missing_files == {"left": 0, "right": 0}
    files = table.image_files("left")
    assert files[0] == str(ODIR / raw[0]["left_image"]) and Path(files[0]).is_file()
    assert all((f is None) == (not e) for f, e in zip(files, left, strict=True))
    expected = np.array([[float(r[c]) for c in ODIR_LABELS] for r in raw], dtype=np.float32)
    assert table.targets.dtype == np.float32 and np.array_equal(table.targets, expected)
    for stage in ("train", "val", "test"):
        want = [i for i, r in enumerate(raw) if r["split"] == stage]
        assert table.rows(stage).tolist() == want
    assert [len(table.rows(s)) for s in ("train", "val", "test")] == [1120, 160, 320]
    demo = table.tabular("demographics")
    assert demo.vocab == [["Female", "Male"]] and demo.cardinalities == [2]
    assert np.array_equal(demo.numeric[:, 0], np.array([float(r["age"]) for r in raw], np.float32))
    assert demo.numeric_present.all()
    sex = np.array([["Female", "Male"].index(r["sex"]) for r in raw])
    assert np.array_equal(demo.categorical[:, 0], sex)
    assert table.modalities() == {"fundus": ["left", "right"]}
    lines = table.summary().splitlines()
    assert len(lines) == 3 and lines[0].startswith("train: 1120 patients")
    train = table.rows("train")
    assert f"left {int(left[train].sum())}" in lines[0]


# ---------------------------------------------------------------------------- input specs
@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "", "kind": "image", "column": "p"}, "non-empty"),
        ({"name": "a", "kind": "text", "column": "p"}, "unknown kind 'text'"),
        ({"name": "a", "kind": "image"}, "needs 'column'"),
        ({"name": "a", "kind": "embedding"}, "needs 'column'"),
        ({"name": "a", "kind": "tabular"}, "at least one numeric or categorical"),
        ({"name": "a", "kind": "tabular", "column": "p", "numeric": ["x"]}, "not 'column'"),
        ({"name": "a", "kind": "image", "column": "p", "numeric": ["x"]}, "tabular inputs only"),
        ({"name": "a", "kind": "image", "column": "p", "colour": 1}, "unknown key.*allowed: name"),
    ],
)
def test_input_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        read_patient_table("unused.csv", [spec], ["y"])


def test_duplicate_names_and_absent_columns(tmp_path):
    path = tab_csv(tmp_path, [["p1", 30, 20, "a", 1, "train"]])
    spec = {"name": "tab", "kind": "tabular", "numeric": ["age"]}
    with pytest.raises(ValueError, match=r"unique: \['tab'\]"):
        read_patient_table(str(path), [spec, spec], ["y"])
    with pytest.raises(ValueError, match="no column 'weight'"):
        read_patient_table(str(path), [{"name": "t", "kind": "tabular", "numeric": ["weight"]}],
                           ["y"])
    assert InputSpec("eye", "image", column="p").modality == "eye"


# ---------------------------------------------------------------------------------- tabular
def test_tabular_vocab_from_training_rows_missing_tokens_and_absence(tmp_path):
    path = tab_csv(tmp_path, [
        ["p1", "30", "21.5", "b", 0, "train"],
        ["p2", " NA ", "", "a", 1, "train"],
        ["p3", "null", "None", "nan", 1, "train"],   # everything missing -> tabular absent
        ["p4", "50", "na", "b", 0, "val"],
        ["p5", "61", "NaN", "c", 1, "test"],         # 'c' never seen in training
        ["p6", "70", "1e1", "c", 0, "test"],
        ["p7", "45", "22", "a", 1, "val"],
    ])
    img = tmp_path / png(tmp_path / "i.png")
    # p3 keeps an image, so it stays in the table with its tabular input absent
    rows = list(csv.reader(path.read_text().splitlines()))
    rows[0].append("img")
    for r in rows[1:]:
        r.append(img.name if r[0] == "p3" else "")
    write_csv(path, rows[0], rows[1:])
    inputs = [*TAB, {"name": "img", "kind": "image", "column": "img"}]
    with pytest.warns(UserWarning, match=r"column 'site': 2 value\(s\) never seen.*\['c'\]") as rec:
        table = read_patient_table(str(path), inputs, ["y"])
    assert len([w for w in rec if "never seen" in str(w.message)]) == 1  # once per column
    t = table.tabular("tab")
    assert t.vocab == [["a", "b"]] and t.cardinalities == [2]
    assert t.categorical[:, 0].tolist() == [1, 0, MISSING_CODE, 1, MISSING_CODE, MISSING_CODE, 0]
    np.testing.assert_array_equal(t.numeric[:, 0], [30, np.nan, np.nan, 50, 61, 70, 45])
    np.testing.assert_array_equal(t.numeric[:, 1], [21.5, np.nan, np.nan, np.nan, np.nan, 10, 22])
    assert t.numeric.dtype == np.float32 and t.categorical.dtype == np.int64
    assert t.numeric_present[:, 1].tolist() == [True, False, False, False, False, True, True]
    assert table.present[:, 0].tolist() == [True, True, False, True, True, True, True]
    assert table.present[:, 1].tolist() == [False, False, True, False, False, False, False]
    assert table.task == "multiclass" and table.label_names == ["0", "1"]
    assert table.targets.tolist() == [0, 1, 1, 0, 1, 0, 1] and table.targets.dtype == np.int64
    with pytest.raises(KeyError, match="no tabular input 'img'"):
        table.tabular("img")


def test_bad_numeric_names_file_row_and_column(tmp_path):
    path = tab_csv(tmp_path, [["p1", "30", "21", "a", 0, "train"],
                              ["p2", "thirty", "20", "a", 1, "train"]])
    with pytest.raises(ValueError, match=r"tab\.csv: row 2 \(patient p2\), column 'age': 'thirty'"):
        read_patient_table(str(path), TAB, ["y"])
    path = tab_csv(tmp_path, [["p1", "inf", "21", "a", 0, "train"]])
    with pytest.raises(ValueError, match="not a finite number"):
        read_patient_table(str(path), TAB, ["y"])


# ----------------------------------------------------------------------------------- images
def test_missing_image_file_is_absent_warned_and_counted(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    path = write_csv(tmp_path / "m.csv", ["patient_id", "eye", "age", "y", "split"], [
        ["p1", "img/a.png", 40, 1, "train"],
        ["p2", "img/gone.png", 41, 0, "train"],
        ["p3", "", 42, 1, "val"],                 # empty: absent, no warning
        ["p4", str(tmp_path / "img" / "b.png"), 43, 0, "test"],
    ])
    inputs = [{"name": "eye", "kind": "image", "column": "eye"},
              {"name": "demo", "kind": "tabular", "numeric": ["age"]}]
    warned = r"'eye': 1 listed file\(s\) do not exist.*gone\.png"
    with pytest.warns(UnreadableImageWarning, match=warned) as rec:
        table = read_patient_table(str(path), inputs, ["y"], task="multilabel")
    assert len(rec) == 1
    assert table.present[:, 0].tolist() == [True, False, False, True]
    assert table.missing_files == {"eye": 1}
    assert table.image_files("eye") == [str(tmp_path / "img" / "a.png"), None, None,
                                        str(tmp_path / "img" / "b.png")]
    assert table.targets.shape == (4, 1) and table.targets[:, 0].tolist() == [1, 0, 1, 0]
    # root= moves the base of relative paths
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = write_csv(other / "m.csv", ["patient_id", "eye", "y"], [["p1", "img/a.png", 1]])
    t2 = read_patient_table(str(moved), inputs[:1], ["y"], split_column=None, val_fraction=0,
                            test_fraction=0, root=str(tmp_path))
    assert t2.image_files("eye") == [str(tmp_path / "img" / "a.png")]


def test_patient_with_nothing_present_is_dropped(tmp_path):
    png(tmp_path / "a.png")
    path = write_csv(tmp_path / "m.csv", ["patient_id", "eye", "age", "y", "split"], [
        ["p1", "a.png", "", 1, "train"],
        ["p2", "", "", 0, "train"],
        ["p3", "", "33", 1, "test"],
        ["p4", "missing.png", "NA", 0, "val"],
    ])
    inputs = [{"name": "eye", "kind": "image", "column": "eye"},
              {"name": "demo", "kind": "tabular", "numeric": ["age"]}]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        table = read_patient_table(str(path), inputs, ["y"])
    dropped = [str(w.message) for w in rec if "dropped" in str(w.message)]
    assert len(dropped) == 1 and "2 patient(s)" in dropped[0] and "p2, p4" in dropped[0]
    assert table.patient_ids == ["p1", "p3"]
    assert table.present.tolist() == [[True, False], [False, True]]
    assert table.split.tolist() == ["train", "test"]
    assert table.rows("val").tolist() == []
    assert table.summary().splitlines()[1] == "test: 1 patients; present: eye 0, demo 1"


# ------------------------------------------------------------------------------- embeddings
def test_embedding_inputs_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "e").mkdir()
    np.save(tmp_path / "e" / "a.npy", np.arange(4, dtype=np.float64).reshape(2, 2))
    save_file({"report": np.full(4, 0.5, dtype=np.float32)}, str(tmp_path / "e" / "b.safetensors"))
    path = write_csv(tmp_path / "m.csv", ["patient_id", "rep", "y1", "y2"], [
        ["p1", "e/a.npy", 1, 0],
        ["p2", "e/b.safetensors", 0, 1],
        ["p3", "", 1.0, 0.0],
        ["p4", "e/gone.npy", 0, 0],
    ])
    inputs = [{"name": "report", "kind": "embedding", "column": "rep"}]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        table = read_patient_table(str(path), inputs, ["y1", "y2"], split_column=None,
                                   val_fraction=0, test_fraction=0)
    assert [w.category for w in rec] == [UnreadableImageWarning, UserWarning]
    assert "'report': 1 listed file" in str(rec[0].message) and "p3, p4" in str(rec[1].message)
    # p3 and p4 have nothing present: dropped
    assert table.patient_ids == ["p1", "p2"]
    emb = table.embeddings("report")
    assert emb.dtype == np.float32 and emb.tolist() == [[0, 1, 2, 3], [0.5] * 4]
    assert table.missing_files == {"report": 1}
    assert table.task == "multilabel" and table.targets.tolist() == [[1, 0], [0, 1]]

    np.save(tmp_path / "e" / "c.npy", np.zeros(3, dtype=np.float32))
    png(tmp_path / "x.png")
    rows = [["p1", "e/a.npy", "x.png", 1], ["p2", "", "x.png", 0], ["p3", "e/c.npy", "x.png", 1]]
    bad = write_csv(tmp_path / "bad.csv", ["patient_id", "rep", "img", "y"], rows)
    both = [*inputs, {"name": "img", "kind": "image", "column": "img"}]
    with pytest.raises(ValueError, match=r"row 3 \(patient p3\).*3 values but .*row 1 .* has 4"):
        read_patient_table(str(bad), both, ["y"], split_column=None)
    rows[2][1] = ""
    ok = read_patient_table(str(write_csv(tmp_path / "ok.csv", ["patient_id", "rep", "img", "y"],
                                          rows)), both, ["y"], split_column=None)
    assert np.isnan(ok.embeddings("report")[1]).all()
    assert ok.present[:, 0].tolist() == [True, False, False]
    save_file({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)},
              str(tmp_path / "e" / "two.safetensors"))
    rows[1][1] = "e/two.safetensors"
    two = write_csv(tmp_path / "two.csv", ["patient_id", "rep", "img", "y"], rows)
    with pytest.raises(ValueError, match="exactly one tensor, holds 2"):
        read_patient_table(str(two), both, ["y"], split_column=None)


# ---------------------------------------------------------------------------- labels, splits
def test_labels_and_split_values(tmp_path):
    path = tab_csv(tmp_path, [["p1", 1, 1, "a", "10", "train"], ["p2", 1, 1, "a", "9", "valid"],
                              ["p3", 1, 1, "a", "10", "validation"],
                              ["p4", 1, 1, "a", "2", "test"]])
    table = read_patient_table(str(path), TAB, ["y"])
    assert table.label_names == ["2", "9", "10"]  # integers sort numerically
    assert table.targets.tolist() == [2, 1, 2, 0]
    assert table.split.tolist() == ["train", "val", "val", "test"]
    path = tab_csv(tmp_path, [["p1", 1, 1, "a", "cat", "train"], ["p2", 1, 1, "a", "ant", "dev"]])
    with pytest.raises(ValueError, match=r"\(patient p2\), column 'split': unknown split 'dev'"):
        read_patient_table(str(path), TAB, ["y"])
    t = read_patient_table(str(path), TAB, ["y"], split_names={"train": "train", "dev": "test"})
    assert t.label_names == ["ant", "cat"] and t.targets.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\(patient p1\), column 'y': multi-label value 'cat'"):
        read_patient_table(str(path), TAB, ["y"], task="multilabel")
    only_val = tab_csv(tmp_path, [["p1", 1, 1, "a", "0", "val"]])
    with pytest.raises(ValueError, match="training split is empty"):
        read_patient_table(str(only_val), TAB, ["y"])


def test_seeded_split_without_split_column(tmp_path):
    rows = [[f"p{i}", i, 20, "a", i % 3, "x"] for i in range(200)]
    path = tab_csv(tmp_path, rows)

    def split(seed):
        return read_patient_table(str(path), TAB, ["y"], split_column=None, val_fraction=0.1,
                                  test_fraction=0.25, split_seed=seed).split

    a, b, c = split(1), split(1), split(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    counts = {s: int((a == s).sum()) for s in ("train", "val", "test")}
    assert abs(counts["val"] - 20) <= 2 and abs(counts["test"] - 50) <= 2
    assert sum(counts.values()) == 200
    # stratified by class: each class keeps its share in the test split
    y = np.arange(200) % 3
    for k in range(3):
        assert abs(int(((a == "test") & (y == k)).sum()) - 0.25 * (y == k).sum()) <= 1
    # an absent split column also means a seeded split
    plain = write_csv(tmp_path / "plain.csv", ["age", "y"], [[i, i % 2] for i in range(10)])
    t = read_patient_table(str(plain), [{"name": "t", "kind": "tabular", "numeric": ["age"]}],
                           ["y"], val_fraction=0.2, test_fraction=0.2)
    assert t.patient_ids == [str(i) for i in range(1, 11)]
    assert sorted(t.split.tolist()) == ["test"] * 2 + ["train"] * 6 + ["val"] * 2


# ------------------------------------------------------------------------------- datamodule
def odir_subset(tmp_path: Path, n: int = 12) -> tuple[Path, list[dict[str, str]]]:
    with open(ODIR / "patients.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        raw = list(reader)
    one_eyed = [r for r in raw if not r["left_image"] or not r["right_image"]][:2]
    rows = [r for r in raw if r not in one_eyed][: n - 2] + one_eyed
    path = write_csv(tmp_path / "odir12.csv", header, [[r[c] for c in header] for r in rows])
    return path, rows


@needs_odir
def test_datamodule_batches_real_patients(tmp_path):
    path, rows = odir_subset(tmp_path)
    dm = PatientDataModule(str(path), ODIR_INPUTS, ODIR_LABELS, root=str(ODIR), image_size=32,
                           batch_size=64)
    assert dm.task == "multilabel" and dm.input_names == ["left", "right", "demographics"]
    assert dm.num_classes == 8 and dm.classes == ODIR_LABELS
    train_rows = [i for i, r in enumerate(rows) if r["split"] == "train"]
    assert dm.split_sizes()["train"] == len(train_rows)
    batch = next(iter(dm.train_dataloader()))
    order = batch["index"].tolist()
    assert batch["index"].dtype == torch.int64 and sorted(order) == train_rows
    assert set(batch["image"]) == {"left", "right"}
    img = batch["image"]["left"]
    assert img.shape == (len(train_rows), 3, 32, 32) and img.dtype == torch.uint8
    assert batch["present"].dtype == torch.bool and batch["present"].shape == (len(train_rows), 3)
    for k, row in enumerate(order):
        r = rows[row]
        assert batch["present"][k].tolist() == [bool(r["left_image"]), bool(r["right_image"]), True]
        assert batch["target"][k].tolist() == [float(r[c]) for c in ODIR_LABELS]
        assert batch["tabular"]["demographics"]["numeric"][k].tolist() == [float(r["age"])]
        assert batch["tabular"]["demographics"]["categorical"][k].tolist() == [
            ["Female", "Male"].index(r["sex"])]
        for m, eye in enumerate(("left", "right")):
            pixels = batch["image"][eye][k]
            assert bool(pixels.any()) == bool(batch["present"][k, m])  # absent: zero placeholder
    assert batch["target"].dtype == torch.float32 and "embedding" not in batch
    # 'index' is the row of the full table, also for val/test
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == [i for i, r in enumerate(rows) if r["split"] == "val"]
    dm.set_load_images(False)
    light = next(iter(dm.test_dataloader()))
    assert "image" not in light and light["present"].shape[1] == 3
    assert dm.table is not None and dm.table.rows("test").tolist() == light["index"].tolist()


@needs_odir
def test_datamodule_multiclass_targets(tmp_path):
    path, rows = odir_subset(tmp_path)
    dm = PatientDataModule(str(path), ODIR_INPUTS[:2], ["D"], load_images=False, root=str(ODIR),
                           split_column=None, val_fraction=0.0, test_fraction=0.25)
    dm.setup("fit")
    assert dm.task == "multiclass" and dm.classes == ["0", "1"] and dm.num_classes == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].dtype == torch.int64 and batch["target"].shape == (len(batch["index"]),)
    assert batch["target"].tolist() == [int(rows[i]["D"]) for i in batch["index"].tolist()]
    assert set(dm.datasets) == {"train", "test"} and "tabular" not in batch
    with pytest.raises(ValueError, match="at least one numeric"):
        PatientDataModule(str(path), [{"name": "t", "kind": "tabular"}], ["D"])


def test_unreadable_image_at_load_time_is_absent(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_csv(tmp_path / "m.csv", ["patient_id", "eye1", "eye2", "y", "split"], [
        ["p1", "a.png", "broken.png", 1, "train"],
        ["p2", "broken.png", "", 0, "train"],
    ])
    inputs = [{"name": "e1", "kind": "image", "column": "eye1"},
              {"name": "e2", "kind": "image", "column": "eye2"}]
    table = read_patient_table(str(path), inputs, ["y"])
    ds = PatientDataset(table, table.rows("train"), load_images=True, image_size=8)
    with pytest.warns(UnreadableImageWarning, match="broken.png.*'e2' of patient p1"):
        item = ds[0]
    assert item["present"].tolist() == [True, False]
    assert table.present[0].tolist() == [True, True]  # the table is not changed
    assert item["image"]["e1"].float().mean() == 100 and not item["image"]["e2"].any()
    with pytest.raises(UnreadablePatientError, match="patient p2 has no readable input"):
        ds[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnreadablePatientError):  # the second failure does not warn again
            ds[1]


def test_a_utf8_bom_keeps_the_patient_id_column(tmp_path):
    """Issue 26 item 16: a manifest saved by Excel starts with a BOM, which read the first
    column as '\\ufeffpatient_id', so the ids were silently replaced by row numbers."""
    path = tab_csv(tmp_path, [["p1", 30, 20, "a", 1, "train"], ["p2", 40, 21, "b", 0, "train"]])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    table = read_patient_table(str(path), TAB, ["y"])
    assert table.patient_ids == ["p1", "p2"]
