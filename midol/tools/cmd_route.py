"""``midol route CKPT (--folder DIR | --manifest CSV | --data CONFIG) --out tags.csv``: tag every
image with the expert (latent modality) the teacher routes it to, and the routing confidence.

Use it on a new corpus before pre-training (with a checkpoint trained on other data) to see
which modality each image resembles, or after pre-training to find the images an expert holds.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

from midol.analysis.features import RoutedImages, collect, routing_loader
from midol.analysis.inputs import module_image_size, pick_device, sources_from_config
from midol.analysis.cluster_metrics import routing_report
from midol.data.corpus import Corpus
from midol.data.sources import DataSource
from midol.analysis.routing_table import format_routing_table
from midol.io.atomic import atomic_write_text
from midol.methods.interfaces import has_routers
from midol.methods.loading import load_method

UNKNOWN = ""


def _manifest_modalities(path: str, path_column: str, modality_column: str) -> list[str] | None:
    """Per-row modality names, aligned with the rows ``DataSource(kind='csv')`` keeps (non-empty
    path cells); None when the manifest has no ``modality_column``."""
    with open(path, newline="", encoding="utf-8") as fh:
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


def write_tags(routed: RoutedImages, names: list[str] | None, out: Path) -> None:
    """One row per image: ``path, expert, confidence[, modality]`` (the first router's expert
    and confidence), plus ``expert_<router>`` columns when the model has several routers."""
    extra = list(routed.routes) if len(routed.routes) > 1 else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "expert", "confidence"] + [f"expert_{r}" for r in extra]
                    + (["modality"] if names else []))
    for i, path in enumerate(routed.paths):
        row = [path, int(routed.expert[i]), f"{float(routed.confidence[i]):.6f}"]
        row += [int(routed.routes[r][i]) for r in extra]
        if names:
            row.append(names[int(routed.index[i])])
        writer.writerow(row)
    atomic_write_text(out, buffer.getvalue())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="midol route",
        description="Tag images with the expert the teacher routes them to and the routing "
        "confidence, as CSV: path, expert, confidence[, modality]. Per image: top-1 of "
        "softmax(teacher router logits / temperature), the teacher's routing before the "
        "batch-level Sinkhorn balancing used in training.",
    )
    p.add_argument("checkpoint", help="a midol pre-training .ckpt")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--folder", help="a folder of images (searched recursively)")
    group.add_argument("--manifest", help="a CSV with a path column (and optionally a modality column)")
    group.add_argument("--data", help="a midol fit config (or a data: block) whose sources to route")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--modality", default=None, help="--folder: modality name written for every image")
    p.add_argument("--path-column", default="path", help="--manifest: column of image paths")
    p.add_argument("--modality-column", default="modality", help="--manifest: column of modality names (used when present)")
    p.add_argument("--root", default=None, help="--manifest: base folder of relative paths (default: the CSV's folder)")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop size (default: the data config's eval/global size, else the checkpoint's img_size, else 224)")
    p.add_argument("--temperature", type=float, default=None,
                   help="router softmax temperature for the confidence (default: the run's teacher_temp)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    if ns.batch_size < 1 or ns.num_workers < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    module = load_method(ns.checkpoint, pick_device(ns.device))
    if not has_routers(module):
        raise ValueError(f"{ns.checkpoint}: this model has no router (e.g. use_moe: false, the "
                         "DINO baseline), so there is no expert to tag images with")
    corpus, names, config_size = build_corpus(ns)
    size = ns.image_size or config_size or module_image_size(module)
    loader = routing_loader(corpus, size, batch_size=ns.batch_size, num_workers=ns.num_workers)
    routed = collect(module, loader, corpus.modalities, ns.temperature, keep_features=False,
                     progress=not ns.no_progress, desc="routing images")
    out = Path(ns.out)
    write_tags(routed, names, out)
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

