"""Small real-data MedMIX setups for tests: a subset of ODIR patients and tiny random experts."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tests.helpers.paths import SHARED_DATA

ODIR = SHARED_DATA / "fundus" / "odir_patients"
ODIR_LABELS = ["N", "D", "G", "C", "A", "H", "M", "O"]
ODIR_INPUTS: list[dict[str, Any]] = [
    {"name": "left_fundus", "kind": "image", "column": "left_image", "modality": "fundus"},
    {"name": "right_fundus", "kind": "image", "column": "right_image", "modality": "fundus"},
    {"name": "demographics", "kind": "tabular", "numeric": ["age"], "categorical": ["sex"]},
]
# Two tiny random experts of different widths and one wider teacher (seeded: same weights on
# every run, so the cached features stay valid)
TINY_EXPERTS: dict[str, list[dict[str, Any]]] = {"fundus": [
    {"name": "vit_a", "backbone": "vit_tiny_patch16_224",
     "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2},
     "image_size": 32, "seed": 0},
    {"name": "vit_b", "backbone": "vit_tiny_patch16_224",
     "backbone_kwargs": {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2},
     "image_size": 32, "seed": 1},
]}
TINY_TEACHER: dict[str, dict[str, Any]] = {"fundus": {
    "name": "teacher", "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 2},
    "image_size": 32, "seed": 2}}


def odir_rows() -> tuple[list[str], list[dict[str, str]]]:
    with open(ODIR / "patients.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def odir_subset(tmp_path: Path, per_split: dict[str, int] | None = None) -> Path:
    """A manifest of the first patients of each split (with some one-eyed ones), paths
    relative to the ODIR folder (pass ``root=ODIR``)."""
    counts = per_split or {"train": 40, "val": 16, "test": 16}
    header, rows = odir_rows()
    chosen: list[dict[str, str]] = []
    for split, n in counts.items():
        members = [r for r in rows if r["split"] == split]
        one_eyed = [r for r in members if not r["left_image"] or not r["right_image"]][:2]
        chosen += one_eyed + [r for r in members if r not in one_eyed][: n - len(one_eyed)]
    path = tmp_path / "odir_subset.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows(chosen)
    return path


def datamodule(manifest: Path, **kwargs: Any) -> Any:
    from midol.data.patient_datamodule import PatientDataModule

    args: dict[str, Any] = {"inputs": ODIR_INPUTS, "label_columns": ODIR_LABELS, "root": str(ODIR),
                            "image_size": 32, "batch_size": 16, "num_workers": 0}
    args.update(kwargs)
    return PatientDataModule(str(manifest), **args)


def medmix(cache_dir: Path, **kwargs: Any) -> Any:
    from midol.fusion.module import MedMIX

    args: dict[str, Any] = {"experts": TINY_EXPERTS, "teachers": TINY_TEACHER, "dim": 16,
                            "hidden_dim": 16, "cache_dir": str(cache_dir), "warmup_epochs": 0,
                            "feature_batch_size": 32}
    args.update(kwargs)
    return MedMIX(**args)
