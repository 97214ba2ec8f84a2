"""Rebuild the bundled sample corpus from the shared data folder (numpy + Pillow only).

    python sample_data/build_sample.py [--shared ../shared/data] [--out sample_data]

Deterministic: files are picked by sorted name at fixed positions, resized with fixed filters,
and the .npz is written with fixed zip timestamps, so a rebuild gives the same bytes for the
same numpy/Pillow/zlib versions. Only openly licensed (CC BY 4.0) sets are used; see
ATTRIBUTION.md for what each folder holds and how it was changed.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parent.parent / "shared" / "data"

XRAY_DIR = "chest_xray/kermany_pneumonia_testsplit_224"
XRAY_PER_CLASS = 30
XRAY_SIZE = 128
PATHOLOGY_DIR = "histopathology/crc_he_tissue_9class"
PATHOLOGY_SIZE = 112
OCT_DIR = "oct/kermany_oct2017_samples"
OCT_WIDTH = 128
# Horizontal windows (left edge, width) as fractions of the B-scan width, full height.
OCT_CROPS = ((0.0, 0.6), (0.2, 0.6), (0.4, 0.6))
RETINA_NPZ = "medmnist/retinamnist.npz"
RETINA_COUNT = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _evenly_spaced(paths: list[Path], count: int) -> list[Path]:
    idx = np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int)
    return [paths[i] for i in idx]


def _resize_width(im: Image.Image, width: int) -> Image.Image:
    height = max(1, round(im.height * width / im.width))
    return im.resize((width, height), Image.Resampling.LANCZOS)


def build_xray(shared: Path, out: Path) -> list[tuple[str, str, str]]:
    rows = []
    for label in ("NORMAL", "PNEUMONIA"):
        for src in _evenly_spaced(_images(shared / XRAY_DIR / label), XRAY_PER_CLASS):
            dst = out / "xray" / label / f"{src.stem}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                gray = im.convert("L").resize((XRAY_SIZE, XRAY_SIZE), Image.Resampling.LANCZOS)
            gray.save(dst, optimize=True)
            rows.append((dst.relative_to(out).as_posix(), "xray", label))
    return rows


def build_pathology(shared: Path, out: Path) -> list[tuple[str, str, str]]:
    rows = []
    root = shared / PATHOLOGY_DIR
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for src in _images(label_dir):
            dst = out / "pathology" / label_dir.name / f"{src.stem}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                rgb = im.convert("RGB").resize(
                    (PATHOLOGY_SIZE, PATHOLOGY_SIZE), Image.Resampling.LANCZOS
                )
            rgb.save(dst, quality=90)
            rows.append((dst.relative_to(out).as_posix(), "pathology", label_dir.name))
    return rows


def build_oct(shared: Path, out: Path) -> list[tuple[str, str, str]]:
    rows = []
    root = shared / OCT_DIR
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for src in _images(label_dir):
            with Image.open(src) as im:
                gray = im.convert("L")
            crops = [("", gray)]
            for k, (left, width) in enumerate(OCT_CROPS):
                x0, x1 = round(left * gray.width), round((left + width) * gray.width)
                crops.append((f"_crop{k}", gray.crop((x0, 0, x1, gray.height))))
            for suffix, img in crops:
                dst = out / "oct" / label_dir.name / f"{src.stem}{suffix}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                _resize_width(img, OCT_WIDTH).save(dst, optimize=True)
                rows.append((dst.relative_to(out).as_posix(), "oct", label_dir.name))
    return rows


def build_retina(shared: Path, out: Path) -> None:
    with np.load(shared / RETINA_NPZ) as npz:
        arrays = {
            "train_images": np.ascontiguousarray(npz["train_images"][:RETINA_COUNT]),
            "train_labels": np.ascontiguousarray(npz["train_labels"][:RETINA_COUNT]),
        }
    # Same layout as np.savez_compressed, but with fixed timestamps so the bytes are reproducible.
    with zipfile.ZipFile(out / "fundus_retinamnist.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the corpus")
    args = parser.parse_args()
    shared, out = args.shared.resolve(), args.out.resolve()
    if not shared.is_dir():
        raise SystemExit(f"shared data folder not found: {shared}")
    for sub in ("xray", "pathology", "oct"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_xray(shared, out) + build_pathology(shared, out) + build_oct(shared, out)
    build_retina(shared, out)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "modality", "label"])
        writer.writerows(rows)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {len(rows)} image files + {RETINA_COUNT} npz images to {out} ({total / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
