"""Labelled data for downstream-task tests, made from the bundled real sample images: CSV
manifests, a multi-label manifest from the corpus' metadata, image/mask pairs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

MULTILABELS = ["xray", "abnormal", "pathology"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def multilabel_manifest(sample_data: Path, out: Path) -> Path:
    """X-ray, OCT and pathology images; labels: modality is X-ray, image is not NORMAL, pathology."""
    rows = []
    for r in csv.DictReader(open(sample_data / "labels.csv")):
        if r["modality"] in ("xray", "oct", "pathology"):
            rows.append([str(sample_data / r["path"]), str(int(r["modality"] == "xray")),
                         str(int(r["label"] not in ("NORMAL", "NORM", "ADI", "BACK"))),
                         str(int(r["modality"] == "pathology"))])
    return write_csv(out / "multilabel.csv", ["path", *MULTILABELS], rows)


def pathology_pairs(sample_data: Path, folder: Path, n: int = 6) -> Path:
    """Real H&E tiles with real-derived masks: tissue = grey level below 200."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for src in sorted((sample_data / "pathology").rglob("*.jpg"))[:n]:
        shutil.copy(src, folder / "images" / src.name)
        gray = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(((gray < 200) * 255).astype(np.uint8)).save(folder / "masks" / f"{src.stem}_mask.png")
    return folder
