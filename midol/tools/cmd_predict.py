"""``midol predict CKPT --images FOLDER_OR_CSV --out preds.csv``: predictions of a fine-tuned
classification (``midol.tasks.ClassificationModule``) or multi-label
(``midol.tasks.MultiLabelModule``) model on a folder of images or a CSV manifest, one CSV row per
image::

    path,prediction,prob_NORMAL,prob_PNEUMONIA
    xray/NORMAL/IM-0001-0001.png,NORMAL,0.912345,0.087655

``prediction``: the most probable class (multi-class, softmax), or the labels whose probability
is at least ``--threshold`` joined by ``;`` (multi-label, sigmoid). Class names, the input size
and the backbone's architecture come from the checkpoint (midol records them when it saves a
fine-tuned model); images get the evaluation transform of training (shorter side resized to the
input size, centre crop) and the model's own normalisation. Unreadable images are left out and
named on stderr. A MedMIX deployable export (``midol export MEDMIX.ckpt --out DIR``, then
``midol predict DIR --images patients.csv``) scores one row per patient, from the export alone.
Segmentation checkpoints are not supported.

This is a tool, not LightningCLI's ``predict`` subcommand (which midol does not offer: it needs
the training config and writes no file).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

from midol.errors import UsageError
from midol.tools.options import add_trust_option


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="midol predict", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned classification or multi-label .ckpt, or a "
                                      "MedMIX export folder (medmix.json)")
    p.add_argument("--images", required=True,
                   help="a folder (its images, sub-folders included) or a .csv manifest")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--path-column", default="path", help="CSV manifest: the column of image paths")
    p.add_argument("--root", default=None,
                   help="CSV manifest: folder its relative paths start from (default: the CSV's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the one the model was fine-tuned at, from the checkpoint)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="multi-label: a label is predicted when its probability is >= this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--decimals", type=int, default=6, help="digits of the probabilities")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_option(p)
    return p


def list_images(images: str, path_column: str = "path", root: str | None = None) -> tuple[list[str], list[str]]:
    """``(files to read, paths to write)``: a folder's images in a sorted walk (written
    relative to the folder), or a CSV manifest's ``path_column`` (written as in the CSV)."""
    from midol.data.readers import csv_base, read_csv_rows, scan_images

    full = os.path.expanduser(images)
    if os.path.isdir(full):
        files = scan_images(full)
        if not files:
            raise UsageError(f"--images {images}: no image file in the folder")
        return files, [os.path.relpath(f, full) for f in files]
    if not os.path.exists(full):
        raise FileNotFoundError(f"--images {images}: no such folder or file")
    if not full.lower().endswith(".csv"):
        raise UsageError(f"--images {images}: give a folder of images or a .csv manifest")
    rows = read_csv_rows(full, [path_column], name=f"--images {images}")
    base = csv_base(full, root)
    written = [(r[path_column] or "").strip() for r in rows]
    empty = [n + 2 for n, w in enumerate(written) if not w]
    if empty:
        raise UsageError(f"--images {images}: row {empty[0]} has an empty {path_column!r}")
    return [os.path.join(base, os.path.expanduser(w)) for w in written], written


class _Images:
    """Evaluation crops of ``files``; an unreadable file gives None (left out by the collate)."""

    def __init__(self, files: list[str], size: int) -> None:
        from midol.data.transforms.eval import EvalTransform

        self.files, self.transform = files, EvalTransform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        from midol.data.image_io import UnreadableImageError, load_image

        try:
            return i, self.transform(load_image(self.files[i]))
        except (UnreadableImageError, OSError):
            return i, None


def _collate(items: list[tuple[int, Any]]) -> tuple[list[int], Any, list[int]]:
    import torch

    kept = [(i, x) for i, x in items if x is not None]
    images = torch.stack([x for _, x in kept]) if kept else None
    return [i for i, _ in kept], images, [i for i, x in items if x is None]


def check_predictable(module: Any, checkpoint: str) -> str:
    """The module's prediction rule (``softmax``/``sigmoid``), or a UsageError saying what the
    checkpoint is instead."""
    rule = getattr(module, "prediction", None)
    if rule in ("softmax", "sigmoid"):
        return str(rule)
    name = type(module).__name__
    if hasattr(module, "deployable") or "MedMIX" in name:
        what = "a MedMIX fusion model (several inputs per patient): midol predict does not support it yet"
    elif hasattr(module, "export_modules"):
        what = (f"a pre-training checkpoint ({name}): fine-tune it first (configs/finetune/) and "
                "predict with the fine-tuned checkpoint")
    else:
        what = f"a {name}, which has no per-image class prediction"
    raise UsageError(f"{checkpoint} is {what}; midol predict takes a fine-tuned "
                     "ClassificationModule or MultiLabelModule checkpoint")


def predict(module: Any, files: list[str], size: int, batch_size: int = 64, num_workers: int = 0,
            progress: bool = False) -> tuple[Any, list[int]]:
    """Probabilities (N x classes, float64 numpy; NaN rows for unreadable files) of ``module``
    on ``files`` through the evaluation transform at ``size``, and the unreadable indices."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    rule = check_predictable(module, "the model")
    device = next(module.parameters()).device
    loader: Any = DataLoader(_Images(files, size), batch_size=batch_size, shuffle=False,  # type: ignore[arg-type]
                        num_workers=num_workers, collate_fn=_collate)
    probs: Any = None
    unreadable: list[int] = []
    module.eval()
    with torch.no_grad():
        for index, images, bad in tqdm(loader, desc="midol predict", disable=not progress):
            unreadable += bad
            if images is None:
                continue
            logits = module(images.to(device)).float()
            p = logits.softmax(dim=-1) if rule == "softmax" else logits.sigmoid()
            if probs is None:
                probs = np.full((len(files), p.shape[1]), np.nan)
            probs[index] = p.double().cpu().numpy()
    if probs is None:
        raise UsageError(f"none of the {len(files)} images could be read")
    return probs, unreadable


def format_rows(paths: list[str], probs: Any, names: list[str], rule: str, threshold: float,
                decimals: int, skip: set[int]) -> str:
    """The CSV text: ``path,prediction,prob_<name>...``, one row per readable image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "prediction", *(f"prob_{n}" for n in names)])
    for i, path in enumerate(paths):
        if i in skip:
            continue
        row = probs[i]
        if rule == "softmax":
            prediction = names[int(row.argmax())]
        else:
            prediction = ";".join(n for n, p in zip(names, row) if p >= threshold)
        writer.writerow([path, prediction, *(f"{p:.{decimals}f}" for p in row)])
    return buf.getvalue()


def is_medmix_export(path: str) -> bool:
    """A MedMIX deployable export: its folder, or its ``medmix.safetensors``."""
    p = Path(path)
    return (p / "medmix.json").is_file() or (p.name.endswith(".safetensors")
                                              and p.with_suffix(".json").is_file() and "medmix" in p.name)


def predict_patients(ns: argparse.Namespace, out: Path) -> int:
    """MedMIX: one row per patient of the ``--images`` CSV (the inputs' columns as in
    training), from the deployable export alone (``midol export CKPT --out DIR``)."""
    from midol.analysis.inputs import pick_device
    from midol.fusion.score import load_for_scoring, score_patients, scoring_table
    from midol.io.atomic import atomic_write_text

    if not str(ns.images).lower().endswith(".csv"):
        raise UsageError("a MedMIX model scores patients: --images must be a CSV with one row per "
                         "patient and the input columns of training")
    model, meta = load_for_scoring(ns.checkpoint)
    table = scoring_table(meta, ns.images, ns.root)
    probs, used = score_patients(model, meta, table, ns.batch_size, pick_device(ns.device))
    names = list(meta["label_names"])
    rule = "sigmoid" if table.task == "multilabel" else "softmax"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["patient_id", "prediction", *[f"prob_{n}" for n in names], "inputs_used"])
    for pid, p, mask in zip(table.patient_ids, probs, used, strict=True):
        if rule == "softmax":
            prediction = names[int(p.argmax())]
        else:
            prediction = ";".join(n for n, v in zip(names, p, strict=True) if v >= ns.threshold)
        inputs = ";".join(n for n, m in zip(table.input_names, mask, strict=True) if m)
        writer.writerow([pid, prediction, *[f"{v:.{ns.decimals}f}" for v in p], inputs])
    atomic_write_text(out, buf.getvalue())
    print(f"wrote {out}: {len(table)} patient(s), {len(names)} labels ({', '.join(names[:10])})")
    return 0


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    if ns.batch_size < 1 or ns.num_workers < 0 or ns.decimals < 1:
        raise UsageError("--batch-size must be >= 1, --num-workers >= 0 and --decimals >= 1")
    if ns.image_size is not None and ns.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {ns.image_size}")
    out = Path(ns.out)
    from midol.analysis.inputs import pick_device
    from midol.errors import OutputFileError
    from midol.io.atomic import atomic_write_text
    from midol.methods.loading import load_method

    if out.is_dir():
        raise OutputFileError(f"--out {out} is a folder; give the CSV file to write")
    if not os.access(out.parent if str(out.parent) else ".", os.W_OK):
        raise OutputFileError(f"--out {out}: its folder {out.parent} does not exist or cannot be written")
    if is_medmix_export(ns.checkpoint):
        return predict_patients(ns, out)
    files, paths = list_images(ns.images, ns.path_column, ns.root)
    module = load_method(ns.checkpoint, pick_device(ns.device), tuple(ns.class_path))
    rule = check_predictable(module, ns.checkpoint)
    size = ns.image_size or module.input_size()
    if size is None:
        raise UsageError(f"{ns.checkpoint} does not record its input size (written by an older "
                         "midol); pass --image-size (the data.init_args.image_size of its fit)")
    probs, unreadable = predict(module, files, size, ns.batch_size, ns.num_workers,
                                progress=not ns.no_progress)
    names = module.output_names() or [str(k) for k in range(probs.shape[1])]
    if len(names) != probs.shape[1]:
        raise UsageError(f"{ns.checkpoint}: {len(names)} class names for {probs.shape[1]} outputs")
    atomic_write_text(out, format_rows(paths, probs, names, rule, ns.threshold, ns.decimals,
                                       set(unreadable)))
    if unreadable:
        shown = ", ".join(files[i] for i in unreadable[:3])
        print(f"midol predict: warning: {len(unreadable)} unreadable image(s) left out, e.g. {shown}",
              file=sys.stderr)
    print(f"wrote {out}: {len(files) - len(unreadable)} image(s), {len(names)} classes "
          f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}), input {size} px")
    return 0
