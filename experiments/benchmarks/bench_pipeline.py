"""Data-pipeline throughput per CPU core (issue 6, item 1c): source images/s of the multi-crop
augmentation, for midol's ``MultiCropTransform`` (albumentations/OpenCV, uint8 out, normalised
on the device), DINO's PIL/torchvision pipeline restated (``dino_torchvision.py``) and
lightly's ``DINOTransform`` (PIL/torchvision, float out).

    taskset -c 1 python experiments/benchmarks/bench_pipeline.py \\
        --out experiments/results/bench_pipeline_cpu.md

Real images from ``../shared/data`` (fundus 512 px and 565x584, dermoscopy 763x553, OCT
1101x408, chest X-ray and pathology 224 px; ``--per-set`` files of each), or the bundled
``sample_data/`` when that folder is absent. One process, one thread (torch and OpenCV), pinned
to ``--cpu``. ``transform``: the augmentation of already decoded images; ``decode+transform``:
file to views, what a DataLoader worker does per item. Every figure is the median of
``--repeats`` passes over all images (range in brackets), after one warm-up pass; the
pipelines take turns pass by pass, so a change of load during the run hits all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_spread, header, markdown_table, median_spread, python_command  # noqa: E402
from dino_torchvision import DINOTorchvisionTransform, pil_loader  # noqa: E402

from midol.data.image_io import load_image  # noqa: E402
from midol.data.transforms import MultiCropTransform  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
# (folder under ../shared/data, file pattern): realistic medical sources from 224 to 1101 px.
SHARED_SETS = [
    ("fundus/odir_disease_eye", "*.jpg"),
    ("fundus/drive_vessel_seg/training/images", "*.tif"),
    ("dermoscopy/ph2_lesion/images", "*.jpg"),
    ("oct/octdl_amd_vid_samples", "*.jpg"),
    ("chest_xray/kermany_pneumonia_testsplit_224", "*.jpeg"),
    ("histopathology/crc_he_tissue_9class", "*.tif"),
]
PIPELINES = ("ours", "torchvision", "lightly")
VIEW_SETTINGS = {"dino": (224, 96), "authors": (224, 224)}


def image_paths(per_set: int, data_root: Path | None) -> tuple[list[Path], str]:
    root = data_root or SHARED
    if root.is_dir():
        paths = []
        for folder, pattern in SHARED_SETS:
            found = sorted((root / folder).rglob(pattern))[:per_set]
            if not found:
                raise FileNotFoundError(f"no {pattern} under {root / folder}")
            paths += found
        return paths, f"{root} ({len(SHARED_SETS)} sets x {per_set})"
    sample = REPO / "sample_data"
    paths = sorted(p for p in sample.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return paths, f"{sample} (../shared/data absent: small images, not representative)"


def build(pipeline: str, views: str, seed: int) -> tuple[Callable[[Any], Any], Callable[[Path], Any]]:
    """(transform, decoder) of a pipeline; the decoder makes what the transform takes."""
    g, loc = VIEW_SETTINGS[views]
    if pipeline == "ours":
        return MultiCropTransform(global_size=g, local_size=loc, seed=seed), load_image
    if pipeline == "torchvision":
        return DINOTorchvisionTransform(global_size=g, local_size=loc), lambda p: pil_loader(str(p))
    if pipeline == "lightly":
        from lightly.transforms import DINOTransform

        return DINOTransform(global_crop_size=g, local_crop_size=loc), lambda p: pil_loader(str(p))
    raise ValueError(f"unknown pipeline {pipeline!r}")


def interleaved_rates(fns: list[Callable[[Any], Any]], items: list[Any], repeats: int) -> list[list[float]]:
    """Images/s of every function over ``items``: one warm-up pass each, then ``repeats``
    rounds that time one pass of every function in turn, so that a change of the machine's
    load during the run affects all of them alike."""
    for fn in fns:
        for item in items:
            fn(item)
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for item in items:
                fn(item)
            rates[k].append(len(items) / (time.perf_counter() - t0))
    return rates


def check_views(views: list[torch.Tensor], setting: str) -> str:
    g, loc = VIEW_SETTINGS[setting]
    sizes = [tuple(v.shape[-2:]) for v in views]
    expected = [(g, g)] * 2 + [(loc, loc)] * 6
    if sizes != expected:
        raise AssertionError(f"{setting}: got view sizes {sizes}, expected {expected}")
    return str(views[0].dtype).replace("torch.", "")


def run(args: argparse.Namespace) -> tuple[list[list[object]], str]:
    paths, where = image_paths(args.per_set, args.data_root)
    rows = []
    for views in args.views:
        built = {p: build(p, views, args.seed) for p in args.pipelines}
        decoded = {p: [decode(x) for x in paths] for p, (_, decode) in built.items()}
        dtypes = {p: check_views(t(decoded[p][0]), views) for p, (t, _) in built.items()}
        for mode in args.modes:
            if mode == "transform":  # each pipeline on its own decoded form (array or PIL)
                items: list[Any] = list(range(len(paths)))
                fns = [(lambda i, t=built[p][0], xs=decoded[p]: t(xs[i])) for p in args.pipelines]
            else:
                items = paths
                fns = [(lambda x, t=built[p][0], d=built[p][1]: t(d(x))) for p in args.pipelines]
            for p, rates in zip(args.pipelines, interleaved_rates(fns, items, args.repeats)):
                med = median_spread(rates)[0]
                rows.append([p, views, mode, fmt_spread(rates, 1), f"{1e3 / med:.2f}", dtypes[p]])
                print(f"{p:12s} {views:8s} {mode:17s} {fmt_spread(rates, 1)} img/s", flush=True)
    return rows, where


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--views", nargs="+", choices=sorted(VIEW_SETTINGS), default=["dino", "authors"])
    p.add_argument("--modes", nargs="+", choices=("transform", "decode+transform"),
                   default=["transform", "decode+transform"])
    p.add_argument("--per-set", type=int, default=10, help="images per shared-data set")
    p.add_argument("--data-root", type=Path, default=None, help="default: ../shared/data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if "lightly" in args.pipelines:
        try:
            import lightly  # noqa: F401
        except ImportError:
            p.error("--pipelines lightly needs lightly: pip install -e '.[bench]'")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # as in midol's DataLoader workers: no OpenCV thread pool
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    head = header("Data-pipeline throughput per CPU core", torch.device("cpu"), python_command())
    rows, where = run(args)
    lines = head + [
        f"* images: {where}",
        f"* one process, 1 torch thread, cv2.setNumThreads(0), {args.repeats} timed passes "
        "after one warm-up pass, pipelines in turn; median (range)",
        "",
    ]
    lines += markdown_table(
        ["pipeline", "views", "mode", "source img/s per core", "ms/img", "output dtype"], rows
    )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
