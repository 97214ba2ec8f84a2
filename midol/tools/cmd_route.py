"""``midol route CKPT (--folder DIR | --manifest CSV | --data CONFIG) --out tags.csv``: tag every
image with the expert (latent modality) the teacher routes it to, and the routing confidence.

Use it on a new corpus before pre-training (with a checkpoint trained on other data) to see
which modality each image resembles, or after pre-training to find the images an expert holds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from midol.analysis.features import RoutedImages, collect, routing_loader
from midol.analysis.inputs import pick_device, resolve_image_size, sources_from_config
from midol.analysis.routing_table import format_routing_table
from midol.data.corpus import Corpus
from midol.data.sources import DataSource
from midol.errors import InputFileError, OutputFileError, UsageError
from midol.io.atomic import atomic_write_text, default_file_mode
from midol.methods.interfaces import has_routers
from midol.methods.loading import load_method
from midol.tools.options import add_trust_option
from midol.utils.cluster_metrics import routing_report

UNKNOWN = ""


def _manifest_modalities(path: str, path_column: str, modality_column: str) -> list[str] | None:
    """Per-row modality names, aligned with the rows ``DataSource(kind='csv')`` keeps (non-empty
    path cells); None when the manifest has no ``modality_column``."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if modality_column not in (reader.fieldnames or []):
            return None
        return [(row.get(modality_column) or "").strip() for row in reader
                if (row.get(path_column) or "").strip()]


def build_corpus(ns: argparse.Namespace) -> tuple[Corpus, list[str] | None, int | None]:
    """The corpus to route, the per-item modality names (None: unknown) and the config's size."""
    if ns.data:
        sources, size = sources_from_config(ns.data)
        corpus = Corpus(sources)
        names = [corpus.modalities[corpus.modality(i)] for i in range(len(corpus))]
        return corpus, names, size
    if ns.folder:
        corpus = Corpus([DataSource(ns.folder, ns.modality or "unknown", kind="folder")])
        return corpus, [ns.modality] * len(corpus) if ns.modality else None, None
    source = DataSource(ns.manifest, "unknown", kind="csv", path_column=ns.path_column, root=ns.root)
    corpus = Corpus([source])
    names = _manifest_modalities(ns.manifest, ns.path_column, ns.modality_column)
    if names is not None and len(names) != len(corpus):
        raise ValueError(f"{ns.manifest}: {len(names)} modality cells for {len(corpus)} paths")
    if names is not None and any(n == UNKNOWN for n in names):
        raise ValueError(f"{ns.manifest}: empty cells in the modality column {ns.modality_column!r}")
    return corpus, names, None


def tag_header(router_names: list[str], with_modality: bool) -> list[str]:
    """``path, expert, confidence[, expert_<router>...][, modality]``: ``expert`` and
    ``confidence`` are the first router's; ``expert_<router>`` columns when there are several."""
    extra = router_names if len(router_names) > 1 else []
    return (["path", "expert", "confidence"] + [f"expert_{r}" for r in extra]
            + (["modality"] if with_modality else []))


def tag_rows(routed: RoutedImages, names: list[str] | None) -> list[list[Any]]:
    """The CSV rows of ``routed`` (see :func:`tag_header`)."""
    extra = list(routed.routes) if len(routed.routes) > 1 else []
    rows = []
    for i, path in enumerate(routed.paths):
        row: list[Any] = [path, int(routed.expert[i]), f"{float(routed.confidence[i]):.6f}"]
        row += [int(routed.routes[r][i]) for r in extra]
        if names:
            row.append(names[int(routed.index[i])])
        rows.append(row)
    return rows


def write_tags(routed: RoutedImages, names: list[str] | None, out: Path) -> None:
    """All rows of ``routed`` at once, atomically (``midol route`` itself writes per batch)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(tag_header(list(routed.routes), bool(names)))
    writer.writerows(tag_rows(routed, names))
    atomic_write_text(out, buffer.getvalue(), errors="surrogateescape")


def check_writable(out: Path) -> None:
    """``OutputFileError`` unless ``out`` can be written, checked before any model or image is
    loaded: its folder is made if missing and a probe file created there (``<out>.partial`` is
    written there); an existing ``out`` is opened for appending, not changed."""
    if out.is_dir():
        raise OutputFileError(f"--out {out}: is a folder; give the path of a CSV file")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputFileError(f"--out {out}: {ancestor} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # a write-protected CSV is not replaced either
            with open(out, "a", encoding="utf-8"):
                pass
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise OutputFileError(f"--out {out}: cannot write there ({err.strerror or err})") from err


def _merge(parts: list[RoutedImages], modalities: list[str], sizes: dict[str, int],
           skipped: list[str]) -> RoutedImages:
    """One :class:`RoutedImages` of the per-batch results."""
    def cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    first = next(iter(sizes), None)
    return RoutedImages(
        paths=[p for part in parts for p in part.paths],
        index=cat([p.index for p in parts], np.int64),
        modality=cat([p.modality for p in parts], np.int64),
        expert=cat([p.expert for p in parts], np.int64),
        confidence=cat([p.confidence for p in parts], np.float32),
        features=None, modalities=list(modalities),
        num_experts=int(sizes[first]) if first else 1, skipped=skipped,
        routes={r: cat([p.routes[r] for p in parts], np.int64) for r in sizes},
        router_sizes=dict(sizes),
    )


def partial_path(out: Path) -> Path:
    """Where ``midol route`` writes its rows until every image is routed: ``<out>.partial``
    beside ``out`` (same folder, so the final rename is atomic; its name marks it incomplete)."""
    return out.with_name(out.name + ".partial")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def route_to_csv(module: Any, loader: Any, modalities: list[str], names: list[str] | None,
                 out: Path, temperature: float | None, progress: bool) -> RoutedImages:
    """Route every batch and append its rows to ``<out>.partial`` as it goes (flushed per
    batch), renamed onto ``out`` once every image is routed: a rerun never truncates the
    previous ``out``, and an interrupted or killed run leaves the rows routed so far in a file
    whose name says it is incomplete. The merged results at the end."""
    sizes = module.routers()
    parts: list[RoutedImages] = []
    skipped: list[str] = []
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes (it
    # aborted the run before, issue 26 item 16), so the path in the CSV names the real file
    with open(partial, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(tag_header(list(sizes), bool(names)))
        fh.flush()
        try:
            for batch in tqdm(loader, desc="routing images", total=len(loader),
                              disable=not progress, leave=False):
                skipped.extend(batch.get("skipped", ()))
                if batch["image"].shape[0] == 0:
                    continue
                part = collect(module, [batch], modalities, temperature, keep_features=False,
                               progress=False)
                writer.writerows(tag_rows(part, names))
                fh.flush()
                written += len(part.paths)
                parts.append(part)
            os.fsync(fh.fileno())
        except BaseException:
            kept = f"{out} is unchanged" if out.exists() else f"{out} is not written"
            print(f"midol route: stopped after {written} image(s); their rows are in {partial} "
                  f"(incomplete; {kept})", file=sys.stderr)
            raise
    if not parts:
        partial.unlink(missing_ok=True)
        raise InputFileError("no readable image to route: " + "; ".join(skipped[:5]))
    os.chmod(partial, default_file_mode())
    os.replace(partial, out)
    _fsync_folder(out.parent)
    return _merge(parts, modalities, sizes, skipped)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (a kill, a job scheduler) ends the run through Python, like Ctrl-C, so the
    "stopped after ... (incomplete)" note is printed; exit status 143 (128 + SIGTERM). Only in
    the main thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_route_checkpoint(path: str) -> None:
    """``UsageError`` for an exported backbone: routing needs the router, which lives in the
    training checkpoint's projection heads (``midol export`` keeps the backbone only)."""
    p = Path(path)
    if p.suffix == ".safetensors" or (p.is_dir() and any(p.glob("*.safetensors"))):
        raise UsageError(
            f"{path}: an exported backbone (.safetensors) holds the backbone weights only, not "
            "the router that picks an image's expert (midol export leaves the projection heads "
            "out); midol route needs the training checkpoint it came from (.ckpt, e.g. "
            "<run>/checkpoints/last.ckpt)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="midol route",
        description="Tag images with the expert the teacher routes them to and the routing "
        "confidence, as CSV: path, expert, confidence[, modality]. Per image: top-1 of "
        "softmax(teacher router logits / temperature), the teacher's routing before the "
        "batch-level Sinkhorn balancing used in training.",
    )
    p.add_argument("checkpoint", help="a midol pre-training .ckpt of a run with a router "
                   "(not an exported .safetensors backbone)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--folder", help="a folder of images (searched recursively)")
    group.add_argument("--manifest", help="a CSV with a path column (and optionally a modality column)")
    group.add_argument("--data", help="a midol fit config (or a data: block) whose sources to route")
    p.add_argument("--out", required=True,
                   help="output CSV, replaced once every image is routed (rows are written to "
                   "<out>.partial as images are routed: an interrupted run keeps them there)")
    p.add_argument("--modality", default=None, help="--folder: modality name written for every image")
    p.add_argument("--path-column", default="path", help="--manifest: column of image paths")
    p.add_argument("--modality-column", default="modality", help="--manifest: column of modality names (used when present)")
    p.add_argument("--root", default=None, help="--manifest: base folder of relative paths (default: the CSV's folder)")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop size (default: the checkpoint's pre-training size; a data "
                   "config that differs is named in a warning)")
    p.add_argument("--temperature", type=float, default=None,
                   help="router softmax temperature for the confidence (default: the run's teacher_temp)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_option(p)
    return p


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    if ns.batch_size < 1 or ns.num_workers < 0:
        raise UsageError("--batch-size must be >= 1 and --num-workers >= 0")
    out = Path(ns.out)
    check_writable(out)
    check_route_checkpoint(ns.checkpoint)
    module = load_method(ns.checkpoint, pick_device(ns.device), tuple(ns.class_path))
    if not has_routers(module):
        raise UsageError(
            f"{ns.checkpoint}: this model has no router ({type(module).__name__} trained with "
            "use_moe: false, e.g. the DINO baseline), so there is no expert to tag images with; "
            "midol route needs a checkpoint of a mixture-of-experts run")
    corpus, names, config_size = build_corpus(ns)
    size = resolve_image_size(ns.image_size, config_size, module)
    loader = routing_loader(corpus, size, batch_size=ns.batch_size, num_workers=ns.num_workers)
    with sigterm_raises():
        routed = route_to_csv(module, loader, corpus.modalities, names, out, ns.temperature,
                              progress=not ns.no_progress)
    counts = routed.counts()
    print(f"wrote {len(routed.paths)} rows to {out} ({routed.num_experts} experts, {size} px)")
    if names and len(set(names)) > 1:
        labels = list(dict.fromkeys(names))  # order of first appearance
        by_name = [labels.index(names[int(i)]) for i in routed.index]
        routed.modality[:] = by_name
        routed.modalities = labels
        counts = routed.counts()
        report = routing_report(counts, labels)
        print(format_routing_table(torch.as_tensor(counts), labels))
        print(f"NMI {report['nmi']:.4f}  purity {report['purity']:.4f}")
    else:
        print("images per expert: " + ", ".join(f"{i}: {int(c)}" for i, c in enumerate(counts.sum(axis=1))))
    if routed.skipped:
        print(f"{len(routed.skipped)} unreadable file(s) skipped, e.g. {routed.skipped[0]}", file=sys.stderr)
    return 0

