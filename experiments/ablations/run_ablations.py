"""Ablation study at small scale (paper Table 2, Fig. 3b, the two L_cst variants and the
collapse counter-measures): pre-train one tiny M-IDoL per row of rows.yaml on the five-modality
corpus of ../shared/data, then measure the teacher's routing NMI/purity over the corpus and a
linear probe (logistic regression on frozen teacher features) on three labelled sets.

Run from the repository root (writes outputs/ablations/<row>/ and the results file):

    .venv/bin/python experiments/ablations/run_ablations.py --out experiments/results/ablation_2026-12-01.md

Options: --rows no_moe,midol (a subset), --max-epochs, --seed, --per-modality.
The results file is rewritten after every row, so an interrupted run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import HELDOUT_PROBES, PROBES, evaluate, folder_classes, npz_classes, routing_set  # noqa: E402

from midol.config_compose import merge  # noqa: E402
from midol.methods.loading import load_pretrain_module  # noqa: E402
from midol.cli import main as midol_main  # noqa: E402
from midol.data.sources import DataSource  # noqa: E402
from midol.methods import PretrainModule  # noqa: E402

BASE = REPO / "configs/ablations/base.yaml"
SHARED = REPO / "experiments/ablations/shared_data.yaml"
ROWS = REPO / "experiments/ablations/rows.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"


def row_config(base: dict[str, Any], row: dict[str, Any], out: Path, epochs: int, seed: int) -> dict[str, Any]:
    # a deep copy: the row's trainer and callbacks are edited below, the base is shared
    cfg = copy.deepcopy(merge(base, {"model": {"init_args": row.get("model", {})}}))
    cfg["seed_everything"] = seed
    trainer = cfg["trainer"]
    trainer.update(max_epochs=epochs, default_root_dir=str(out), enable_progress_bar=False,
                   enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / "checkpoints")
        if callback["class_path"].endswith("RoutingMonitor"):
            callback["init_args"]["image_dir"] = str(out / "routing")
    trainer["callbacks"].append({"class_path": "teacher_drift.TeacherDrift"})
    return cfg


def last_values(metrics_csv: Path, keys: list[str], tail: int = 5) -> dict[str, float | None]:
    """Mean of the last ``tail`` logged values of each key (None when never logged)."""
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key)]
        out[key] = sum(values[-tail:]) / len(values[-tail:]) if values else None
    return out


def first_values(metrics_csv: Path, keys: list[str], head: int = 5) -> dict[str, float | None]:
    """Mean of the first ``head`` logged values of each key (None when never logged)."""
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key)][:head]
        out[key] = sum(values) / len(values) if values else None
    return out


def train_row(cfg: dict[str, Any], out: Path, overwrite: bool = False) -> tuple[Path, list[str], float]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # an earlier run's checkpoints in this row's folder stop midol fit unless --overwrite
        midol_main(["fit", "--config", str(path), *(["--overwrite", "true"] if overwrite else [])])
    monitor = [str(w.message) for w in caught if "RoutingMonitor:" in str(w.message)]
    return out / "checkpoints" / "last.ckpt", monitor, time.time() - start


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any], done: bool) -> str:
    probes = list(PROBES)
    lines = [
        f"# Ablations at small scale (paper Table 2, Fig. 3b, L_cst variants, collapse counter-measures){'' if done else ' — PARTIAL'}",
        "",
        f"- Date: {meta['date']}; device: {meta['device']}; load (uptime) before: {meta['load_before']}"
        + (f"; after: {meta['load_after']}" if done else ""),
        f"- Command: `{meta['command']}`",
        f"- Git commit of the tree: {meta['commit']} (plus uncommitted work in progress)",
        f"- Pre-training: configs/ablations/base.yaml + experiments/ablations/shared_data.yaml, one row "
        f"of experiments/ablations/rows.yaml each; tiny Swin (embed 32, depths 2-2-2-2, window 4), "
        f"64 px global / 32 px local views (2 + 6), batch 32, {meta['epochs']} epochs x "
        f"{meta['samples_per_epoch']} draws = {meta['steps']} optimiser steps, seed {meta['seed']} "
        "(one seed per row: differences of a few points are within run-to-run noise).",
        f"- Corpus: {meta['corpus_images']} images of ../shared/data, {meta['corpus_counts']}; "
        "sources weighted so each modality is 1/5 of the draws.",
        f"- Routing: per-image top-1 of the teacher router over {meta['routing_images']} corpus images "
        f"(at most {meta['per_modality']} per modality, seed {meta['seed']}): {meta['routing_counts']}. "
        "NMI = I(expert; modality) / mean(H(expert), H(modality)) (scikit-learn's arithmetic "
        "normalisation); purity = share of images in their expert's majority modality. "
        "k-means NMI: k-means (k = 5) on standardised teacher features vs modality (defined for "
        "every row, including no-MoE).",
        "- Linear probe: frozen teacher features (pooled, 64 px centre crop) -> standardise -> "
        "multinomial logistic regression (C = 1, lbfgs), accuracy over stratified 5-fold "
        "cross-validation (seed 0), on " + ", ".join(f"{k} ({v})" for k, v in PROBES.items())
        + ". These labelled images are also in the (unlabelled) pre-training corpus. Chance "
        "(majority class): " + ", ".join(f"{k} {v:.3f}" for k, v in meta["majority"].items()) + ".",
        "- Held-out probe: the same probe on MedMNIST test splits that are not in the pre-training "
        "corpus (" + ", ".join(HELDOUT_PROBES) + "; 28 px upsampled to the view size), scored by "
        "macro one-vs-rest ROC AUC from out-of-fold probabilities; no setting was chosen on it.",
        "- Teacher change: ||theta_T(end) - theta_T(0)|| / ||theta_T(0)|| of the teacher backbone "
        "(teacher_drift.TeacherDrift); L start / end: mean of the first / last 5 logged steps.",
        "- Warnings: RoutingMonitor collapse warnings during the run (expert share > 0.9 of a "
        "batch for 20 consecutive steps; teacher collapse).",
        "",
        "| row | held-out AUC mean | " + " | ".join(f"{h} AUC" for h in HELDOUT_PROBES)
        + " | corpus probe mean acc | " + " | ".join(probes)
        + " | routing NMI | purity | experts used | max load | k-means NMI | train-assignment NMI (last epoch) | L_route (start -> end) | L_cst (start -> end) | teacher change | warnings | min |",
        "|" + "---|" * (14 + len(probes) + len(HELDOUT_PROBES)),
    ]
    for r in results:
        ev, route = r["eval"], r["eval"]["routing"]
        lines.append(
            f"| {r['label']} | {fmt(ev.get('heldout_mean_auc'))} | "
            + " | ".join(fmt(ev.get("heldout", {}).get(h, {}).get("auc")) for h in HELDOUT_PROBES)
            + f" | {fmt(ev['probe_mean_acc'])} | "
            + " | ".join(f"{fmt(ev['probes'][p]['acc'])} ± {fmt(ev['probes'][p]['std'], 2)}" for p in probes)
            + f" | {fmt(route.get('nmi')) if route['experts_used'] > 1 else fmt(route.get('nmi')) + ' (1 expert)'}"
            f" | {fmt(route.get('purity'))} | {route['experts_used']}/{route['experts']} | {fmt(route['max_load'], 2)}"
            f" | {fmt(ev['kmeans_nmi'])} | {fmt(r.get('train_nmi')) if route['experts'] > 1 else 'n/a'} | {fmt(r.get('l_route_start'))} -> {fmt(r.get('l_route'))} | {fmt(r.get('l_cst_start'))} -> {fmt(r.get('l_cst'))}"
            f" | {fmt(r.get('teacher_change'), 4)} | {len(r.get('warnings', []))} | {r['minutes']:.1f} |"
        )
    lines += ["", "Per-row routing counts (rows = experts, columns = " + ", ".join(meta["modalities"]) + "):", ""]
    for r in results:
        lines.append(f"- {r['name']}: {r['eval']['routing']['counts']}")
    warned = [r for r in results if r.get("warnings")]
    if warned:
        lines += ["", "Warnings:", ""]
        for r in warned:
            lines += [f"- {r['name']}: {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results markdown (a .json with the same stem is written too)")
    p.add_argument("--rows", default="all", help="comma-separated row names of rows.yaml, or all")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-modality", type=int, default=200, help="routing images per modality")
    p.add_argument("--skip-random", action="store_true", help="no random-init reference row")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain rows whose output folder already holds checkpoints (else refused)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 avoids oversubscription on a shared CPU)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers")
    ns = p.parse_args()
    os.chdir(REPO)
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"needs the shared datasets at {SHARED_DATA}")
    torch.set_num_threads(ns.threads)
    # scikit-learn's OpenMP threads (k-means, t-SNE) busy-wait on a loaded machine
    threadpool_limits(limits=ns.threads)
    base = merge(yaml.safe_load(BASE.read_text()), yaml.safe_load(SHARED.read_text()))
    base["data"]["init_args"]["num_workers"] = ns.num_workers
    rows = yaml.safe_load(ROWS.read_text())["rows"]
    if ns.rows != "all":
        wanted = ns.rows.split(",")
        unknown = set(wanted) - {r["name"] for r in rows}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}")
        rows = [r for r in rows if r["name"] in wanted]

    size = base["data"]["init_args"]["transform"]["init_args"]["global_size"]
    sources = [DataSource(**s) for s in base["data"]["init_args"]["sources"]]
    routing = routing_set(sources, size, ns.per_modality, ns.seed)
    probes = {name: folder_classes(SHARED_DATA / rel, size) for name, rel in PROBES.items()}
    heldout = {name: npz_classes(SHARED_DATA / rel, size) for name, rel in HELDOUT_PROBES.items()}
    from midol.data import Corpus

    corpus = Corpus(sources)
    corpus_counts = {m: 0 for m in corpus.modalities}
    for i in range(len(corpus)):
        corpus_counts[corpus.modalities[corpus.modality(i)]] += 1
    spe = base["data"]["init_args"]["samples_per_epoch"]
    bs = base["data"]["init_args"]["batch_size"]
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {ns.num_workers} data worker(s)",
        "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO) if Path(sys.argv[0]).is_absolute() else sys.argv[0]), *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "epochs": ns.max_epochs, "samples_per_epoch": spe, "steps": ns.max_epochs * (spe // bs),
        "seed": ns.seed, "per_modality": ns.per_modality,
        "corpus_images": len(corpus), "corpus_counts": corpus_counts,
        "routing_images": len(routing.labels),
        "routing_counts": {m: int((routing.labels == k).sum()) for k, m in enumerate(routing.names)},
        "modalities": routing.names,
        "majority": {k: float(max((v.labels == c).mean() for c in set(v.labels))) for k, v in probes.items()},
    }
    out_md = Path(ns.out)
    out_json = out_md.with_suffix(".json")
    results: list[dict[str, Any]] = []

    def save(done: bool) -> None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(markdown(results, meta, done))
        out_json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")

    if not ns.skip_random:
        torch.manual_seed(ns.seed)
        start = time.time()
        module = PretrainModule(**base["model"]["init_args"])
        results.append({"name": "random_init", "label": "0. random init, no pre-training (reference)",
                        "eval": evaluate(module, routing, probes, ns.seed, heldout), "minutes": (time.time() - start) / 60})
        save(False)
    for row in rows:
        # one folder per row and seed: runs of several seeds at once must not share checkpoints
        out = REPO / "outputs" / "ablations" / f"{row['name']}_seed{ns.seed}"
        cfg = row_config(base, row, out, ns.max_epochs, ns.seed)
        ckpt, monitor_warnings, seconds = train_row(cfg, out, ns.overwrite)
        start = time.time()
        module = load_pretrain_module(ckpt)
        result: dict[str, Any] = {"name": row["name"], "label": row["label"], "group": row["group"],
                                  "overrides": row.get("model", {}), "warnings": monitor_warnings}
        result["eval"] = evaluate(module, routing, probes, ns.seed, heldout)
        metrics = sorted(out.glob("logs/version_*/metrics.csv"))[-1]
        last = last_values(metrics, ["train/l_route", "train/l_cst"], tail=5)
        first = first_values(metrics, ["train/l_route", "train/l_cst"])
        drift = json.loads((out / "teacher_drift.json").read_text())
        result.update(l_route=last["train/l_route"], l_cst=last["train/l_cst"],
                      l_route_start=first["train/l_route"], l_cst_start=first["train/l_cst"],
                      teacher_change=drift["backbone_relative_change"],
                      train_nmi=last_values(metrics, ["route_epoch/nmi"], tail=1)["route_epoch/nmi"])
        result["minutes"] = (seconds + time.time() - start) / 60
        results.append(result)
        save(False)
        print(f"[ablation] {row['name']}: probe {result['eval']['probe_mean_acc']:.3f}, "
              f"held-out AUC {result['eval']['heldout_mean_auc']:.3f}, "
              f"routing NMI {result['eval']['routing'].get('nmi', float('nan')):.3f}, "
              f"{result['minutes']:.1f} min", flush=True)
    meta["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    save(True)
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
