"""``midol embed --backbone SPEC --images FOLDER --out DIR`` (or ``--manifest CSV``): the frozen
features of every image, one row per image, with any backbone ``midol eval`` takes.

``--out`` gets ``embeddings.npy`` (N x D float32), ``embeddings.safetensors`` (key
``embeddings``), ``manifest.csv`` (``row,path,modality,ok``: row i of the arrays is the image of
manifest row i; an unreadable image has ``ok`` false and a NaN row) and ``embed.json`` (backbone,
read-out, input size, device, counts, midol version). Features go through the feature cache of
``midol eval`` (``--cache_dir``): a run that is killed keeps the batches it embedded and a rerun
embeds only the rest; a second run over the same images embeds nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser

from midol.errors import InputFileError, OutputFileError, UsageError
from midol.tools.cmd_eval import DEFAULT_CACHE

OUTPUTS = ("embeddings.npy", "embeddings.safetensors", "manifest.csv", "embed.json")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="midol embed", description=__doc__.split("\n\n")[0],
                            default_meta=False)
    parser.add_argument("--backbone", type=str, required=True,
                        help="[LABEL=]SPEC: a midol .ckpt[:part], an export .safetensors or folder, "
                             "local-dir:DIR, timm:NAME[,k=v]@WEIGHTS, random:NAME[,k=v]")
    parser.add_argument("--images", type=str | None, default=None,
                        help="a folder of images (sub-folders included, sorted walk) or a .csv "
                             "manifest; or give --manifest")
    parser.add_argument("--manifest", type=str | None, default=None,
                        help="a CSV manifest: one image per row (--path_column, --modality_column)")
    parser.add_argument("--out", type=str, required=True, help="output folder")
    parser.add_argument("--path_column", type=str, default="path",
                        help="CSV manifest: the column of image paths")
    parser.add_argument("--root", type=str | None, default=None,
                        help="CSV manifest: folder its relative paths start from (default: the CSV's)")
    parser.add_argument("--modality_column", type=str | None, default=None,
                        help="CSV manifest: the column of modality names (default: 'modality' "
                             "when the CSV has one)")
    parser.add_argument("--modality", type=str | None, default=None,
                        help="the modality written for images without a modality column "
                             "(default: a folder's name; empty for a manifest)")
    parser.add_argument("--image_size", type=int | None, default=None,
                        help="input side in pixels (default: the backbone's own, from its recipe)")
    parser.add_argument("--readout", type=Literal["cls", "avg", "pool"] | None, default=None,
                        help="ViT family: cls (class token) or avg (mean of patch tokens); other "
                             "backbones: pool (their own pooling). Default: cls, else pool")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="image-decoding worker processes (0: in the main process)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)")
    parser.add_argument("--cache_dir", type=str, default=DEFAULT_CACHE,
                        help="feature cache folder (shared with midol eval; makes a rerun resume)")
    parser.add_argument("--cache_key", type=Literal["stat", "content"], default="stat",
                        help="match cached rows to files by path+size+mtime (stat: free) or by a "
                             "hash of the bytes (content: reads every file once; sees any edit)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out")
    return parser


def list_inputs(cfg: Any) -> tuple[list[str], list[str], list[str], dict[str, Any]]:
    """``(files to read, paths to write, modalities, input description)``: a folder's images in
    a sorted walk (paths relative to the folder), or a CSV manifest's rows (paths as written)."""
    from midol.data.readers import csv_base, read_csv_rows, scan_images

    if (cfg.images is None) == (cfg.manifest is None):
        raise UsageError("give exactly one of --images FOLDER and --manifest CSV")
    option, given = ("--images", cfg.images) if cfg.images is not None else ("--manifest", cfg.manifest)
    full = os.path.expanduser(given)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{option} {given}: no such folder or file")
    if os.path.isdir(full):
        if option == "--manifest":
            raise UsageError(f"--manifest {given} is a folder; give it as --images")
        files = scan_images(full, name=f"--images {given}")
        if not files:
            raise UsageError(f"{option} {given}: no image file in the folder")
        modality = cfg.modality if cfg.modality is not None else Path(os.path.abspath(full)).name
        return (files, [os.path.relpath(f, full) for f in files], [modality] * len(files),
                {"images": given})
    if not full.lower().endswith(".csv"):
        raise UsageError(f"{option} {given}: give a folder of images or a .csv manifest")
    required = [cfg.path_column] + ([cfg.modality_column] if cfg.modality_column else [])
    rows = read_csv_rows(full, required, name=f"{option} {given}")
    column = cfg.modality_column or ("modality" if "modality" in rows[0] else None)
    written = [(r[cfg.path_column] or "").strip() for r in rows]
    empty = [n + 2 for n, w in enumerate(written) if not w]
    if empty:
        raise UsageError(f"{option} {given}: row {empty[0]} has an empty {cfg.path_column!r}")
    base = csv_base(full, cfg.root)
    files = [os.path.join(base, os.path.expanduser(w)) for w in written]
    modalities = [(r.get(column) or "").strip() if column else (cfg.modality or "") for r in rows]
    return files, written, modalities, {"manifest": given, "path_column": cfg.path_column,
                                        "modality_column": column, "root": base}


def check_outputs(out: Path, overwrite: bool) -> None:
    """One-line refusals, before any image is embedded: an unwritable ``out`` or one that holds
    an earlier run's outputs (without ``overwrite``)."""
    from midol.run_guard import check_writable

    if out.exists() and not out.is_dir():
        raise OutputFileError(f"--out {out} is a file; give the folder to write into")
    check_writable(out, "--out")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise OutputFileError(f"--out {out} already holds {', '.join(present)}: pass --overwrite "
                              "to replace them, or choose another folder")


def manifest_text(paths: list[str], modalities: list[str], ok: list[bool]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "path", "modality", "ok"])
    for i, (path, modality, good) in enumerate(zip(paths, modalities, ok, strict=True)):
        writer.writerow([i, path, modality, "true" if good else "false"])
    return buf.getvalue()


def write_outputs(out: Path, embeddings: Any, manifest: str, meta: dict[str, Any]) -> None:
    """The four files, each written atomically; ``embed.json`` last (its presence marks a
    complete set)."""
    import numpy as np
    from safetensors.numpy import save_file

    from midol.io.atomic import atomic_path, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "embeddings.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, embeddings, allow_pickle=False)
    with atomic_path(out / "embeddings.safetensors") as tmp:
        save_file({"embeddings": embeddings}, str(tmp),
                  metadata={"backbone": str(meta["backbone"]["spec"]), "readout": meta["readout"],
                            "image_size": str(meta["image_size"])})
    atomic_write_text(out / "manifest.csv", manifest)
    atomic_write_text(out / "embed.json", json.dumps(meta, indent=2) + "\n")


def main(argv: list[str]) -> int:
    cfg = build_parser().parse_args(argv)
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UsageError("--batch_size must be >= 1 and --num_workers >= 0")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise UsageError(f"--image_size must be >= 1, got {cfg.image_size}")
    import numpy as np
    import torch

    import midol
    from midol.analysis.inputs import pick_device
    from midol.data.feature_cache import FeatureCache
    from midol.data.image_io import UnreadableImageWarning
    from midol.evaluation import features as feats

    out = Path(cfg.out)
    check_outputs(out, cfg.overwrite)
    FeatureCache(cfg.cache_dir, cfg.cache_key).check_writable("--cache_dir")
    device = pick_device(cfg.device)
    files, paths, modalities, source = list_inputs(cfg)
    ref = feats.parse_backbone(cfg.backbone)
    backbone = feats.load(ref)
    readout = cfg.readout or backbone.readouts[0]
    if readout not in backbone.readouts:
        raise UsageError(f"--readout {readout}: backbone {ref.label!r} ({backbone.recipe['model']}) "
                         f"is read out as {' or '.join(backbone.readouts)}")
    size = cfg.image_size or backbone.image_size
    print(f"midol embed: {len(files)} image(s), backbone {ref.label} ({backbone.recipe['model']}), "
          f"read-out {readout}, {size} px, {device}", file=sys.stderr)

    embedder = feats.Embedder(cfg.cache_dir, str(device), cfg.batch_size, cfg.num_workers,
                              cfg.cache_key)
    desc = f"embed {ref.label}"
    default_show = warnings.showwarning
    warned: set[str] = set()

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, UnreadableImageWarning):
            default_show(message, category, *args, **kwargs)
            return
        text = str(message).removeprefix(f"{desc}: ")
        if text not in warned:  # once per file
            warned.add(text)
            print(f"midol embed: warning: {text}", file=sys.stderr)

    start = dt.datetime.now(dt.timezone.utc)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnreadableImageWarning)
        warnings.showwarning = show
        try:
            result = embedder.embed_files(backbone, files, size, desc)
        except ValueError as err:
            if "no readable image" in str(err):
                raise InputFileError(f"none of the {len(files)} images could be read "
                                     f"(e.g. {files[0]})") from None
            raise
    embeddings = np.ascontiguousarray(
        feats.split_readouts(backbone, result.features.numpy())[readout], dtype=np.float32)
    ok = [bool(v) for v in result.ok.tolist()]
    meta: dict[str, Any] = {
        "backbone": {"spec": ref.text, "label": ref.label, "model": backbone.recipe["model"],
                     "source": backbone.recipe["source"], "sha256": feats.sha256_files(ref)},
        "readout": readout, "image_size": size, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "count": len(files), "ok": sum(ok), "dim": int(embeddings.shape[1]),
        "computed": result.computed, "reused": result.reused, "input": source,
        "cache_dir": cfg.cache_dir, "midol": midol.__version__,
        "date": start.strftime("%Y-%m-%d %H:%M UTC"), "command": "midol embed " + shlex.join(argv),
    }
    write_outputs(out, embeddings, manifest_text(paths, modalities, ok), meta)
    bad = len(ok) - sum(ok)
    print(f"midol embed: wrote {out}: {len(files)} x {embeddings.shape[1]} ({result.computed} "
          f"image(s) embedded, {result.reused} from the cache"
          + (f", {bad} unreadable: ok=false, NaN rows" if bad else "") + ")")
    return 0
