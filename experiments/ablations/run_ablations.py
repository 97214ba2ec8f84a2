"""New runs score their probes with midol eval (experiments/scoring.py); older results files used a 5-fold CV probe.

Ablation study at small scale (paper Table 2, Fig. 3b, the two L_cst variants and the
collapse counter-measures): pre-train one tiny M-IDoL per row of rows.yaml on the five-modality
corpus of ../shared/data, then measure the teacher's routing NMI/purity over the corpus, and
score its frozen teacher backbone with midol eval on configs/eval/shared_data.yaml (kNN and
linear probes, 95 % bootstrap CIs, paired verdicts against the random init of the same
architecture; the held-out MedMNIST tasks reported apart from the corpus tasks).

Run from the repository root (writes outputs/ablations/<row>/ and the results file):

    .venv/bin/python experiments/ablations/run_ablations.py --out experiments/results/ablation_<date>.md

Options: --rows no_moe,midol (a subset), --max-epochs, --seed, --per-modality, --protocols.
The results file is rewritten after every row, so an interrupted run keeps its finished rows;
each row's midol eval reports are in outputs/ablations/<row>_seed<seed>/eval/{heldout,corpus}/.
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

from evaluate import probes, routing_metrics, routing_set  # noqa: E402

from experiments import scoring  # noqa: E402  (evaluate put the repository on sys.path)
from midol.cli import main as midol_main  # noqa: E402
from midol.config_compose import merge  # noqa: E402
from midol.data.sources import DataSource  # noqa: E402
from midol.evaluation.suite import load_suite  # noqa: E402
from midol.methods import PretrainModule  # noqa: E402
from midol.methods.loading import load_pretrain_module  # noqa: E402

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


def reference_probes(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The random-init reference row of the midol eval reports (the same architecture and seed
    for every row: its scores are identical in each) and the first row's digests."""
    for r in results:
        if r.get("probes"):
            refs = r["probes"]["heldout"]["references"] or r["probes"]["corpus"]["references"]
            if refs:
                return refs[0], r["probes"]
    return None


def probe_cells(probes: dict[str, Any] | None, row: str, knn: str | None, heldout: list[str],
                reference: bool) -> list[str]:
    """The probe columns of one table row (midol eval's numbers: mean [95 % CI])."""
    if not probes:
        return ["n/a"] * (5 + len(heldout) + (knn is not None))
    ho, co = probes["heldout"], probes["corpus"]
    cells = [scoring.ci_cell(scoring.cell(ho, row)),
             "(reference)" if reference else scoring.verdict_cell(scoring.versus(ho, row))]
    cells += [scoring.ci_cell(scoring.cell(ho, row, task)) for task in heldout]
    if knn is not None:
        cells.append(scoring.ci_cell(scoring.cell(ho, row, setting=knn)))
    cells += [scoring.ci_cell(scoring.cell(co, row)),
              "(reference)" if reference else scoring.verdict_cell(scoring.versus(co, row)),
              "(in each row's reports)" if reference else
              f"`{relative(Path(ho['report']).parent.parent)}/{{heldout,corpus}}/report.md`"]
    return cells


def relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any], done: bool) -> str:
    heldout = list(meta["heldout_tasks"])
    knn = meta.get("knn_setting")
    ref = reference_probes(results)
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
        f"- Probes: the row's frozen teacher backbone (last.ckpt's first part), scored by "
        f"{meta['probe_method']}. Suite {meta['suite']}: held out (MedMNIST, not in the "
        f"pre-training corpus, no setting chosen on them): {', '.join(heldout)}; corpus tasks (their "
        f"images are in the unlabelled pre-training corpus): {', '.join(meta['corpus_tasks'])}. "
        f"`vs random init`: the paired difference with the random init of the same architecture "
        f"(seed {meta['seed']}; the reference row) and midol eval's verdict, pooled over the "
        "group's tasks; each row's full reports (every task, metric and setting) are linked.",
        "- Teacher change: ||theta_T(end) - theta_T(0)|| / ||theta_T(0)|| of the teacher backbone "
        "(teacher_drift.TeacherDrift); L start / end: mean of the first / last 5 logged steps.",
        "- Warnings: RoutingMonitor collapse warnings during the run (expert share > 0.9 of a "
        "batch for 20 consecutive steps; teacher collapse).",
        "",
        "| row | held-out linear AUC (mean of tasks) | vs random init (held-out) | "
        + " | ".join(f"{h} linear AUC [95 % CI]" for h in heldout)
        + (f" | held-out {knn} AUC (mean of tasks)" if knn else "")
        + " | corpus linear AUC (mean of tasks) | vs random init (corpus) | midol eval reports"
        + " | routing NMI | purity | experts used | max load | k-means NMI | train-assignment NMI (last epoch) | L_route (start -> end) | L_cst (start -> end) | teacher change | warnings | min |",
        "|" + "---|" * (17 + len(heldout) + (knn is not None)),
    ]
    for r in results:
        ev, route = r["eval"], r["eval"]["routing"]
        if r["name"] == "random_init":
            row_probes, reference = (ref[1], True) if ref else (None, True)
            key = ref[0] if ref else ""
        else:
            row_probes, reference, key = r.get("probes"), False, r["name"]
        lines.append(
            f"| {r['label']} | " + " | ".join(probe_cells(row_probes, key, knn, heldout, reference))
            + f" | {fmt(route.get('nmi')) if route['experts_used'] > 1 else fmt(route.get('nmi')) + ' (1 expert)'}"
            f" | {fmt(route.get('purity'))} | {route['experts_used']}/{route['experts']} | {fmt(route['max_load'], 2)}"
            f" | {fmt(ev['kmeans_nmi'])} | {fmt(r.get('train_nmi')) if route['experts'] > 1 else 'n/a'} | {fmt(r.get('l_route_start'))} -> {fmt(r.get('l_route'))} | {fmt(r.get('l_cst_start'))} -> {fmt(r.get('l_cst'))}"
            f" | {fmt(r.get('teacher_change'), 4)} | {len(r.get('warnings', []))} | {r['minutes']:.1f} |"
        )
    corpus_tasks = list(meta["corpus_tasks"])
    scored = [r for r in results if r.get("probes")]
    if scored and ref:
        lines += ["", "Corpus tasks, linear AUC [95 % CI] per task (midol eval):", "",
                  "| row | " + " | ".join(corpus_tasks) + " |", "|" + "---|" * (1 + len(corpus_tasks))]
        lines.append(f"| {ref[0]} (reference) | "
                     + " | ".join(scoring.ci_cell(scoring.cell(ref[1]["corpus"], ref[0], t)) for t in corpus_tasks) + " |")
        for r in scored:
            lines.append(f"| {r['name']} | "
                         + " | ".join(scoring.ci_cell(scoring.cell(r["probes"]["corpus"], r["name"], t))
                                      for t in corpus_tasks) + " |")
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
    p.add_argument("--skip-random", action="store_true",
                   help="no routing row for the untrained module (the random-init probe reference "
                        "is part of every midol eval report)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain rows whose output folder already holds checkpoints (else refused)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 avoids oversubscription on a shared CPU)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--protocols", default="knn,linear", help="midol eval protocols (knn, linear, fewshot)")
    p.add_argument("--bootstrap", type=int, default=1000, help="midol eval bootstrap resamples")
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

    options = scoring.study_options(ns.protocols, bootstrap=ns.bootstrap)
    suite = load_suite(scoring.SUITE)
    size = base["data"]["init_args"]["transform"]["init_args"]["global_size"]
    sources = [DataSource(**s) for s in base["data"]["init_args"]["sources"]]
    routing = routing_set(sources, size, ns.per_modality, ns.seed)
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
        "suite": str(scoring.SUITE.relative_to(REPO)),
        "heldout_tasks": list(scoring.HELDOUT_TASKS),
        "corpus_tasks": [t.name for t in suite.tasks if t.name not in scoring.HELDOUT_TASKS],
        "probe_method": scoring.method_text(options),
        "knn_setting": f"knn k={options.knn_k[0]}" if "knn" in options.protocols else None,
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
                        "eval": routing_metrics(module, routing, ns.seed), "minutes": (time.time() - start) / 60})
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
        result["eval"] = routing_metrics(module, routing, ns.seed)
        result["probes"] = probes(ckpt, row["name"], out / "eval", ns.seed, options=options,
                                  command=meta["command"])
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
        ho = result["probes"]["heldout"]
        print(f"[ablation] {row['name']}: held-out linear AUC {scoring.ci_cell(scoring.cell(ho, row['name']))}, "
              f"vs random init {scoring.verdict_cell(scoring.versus(ho, row['name']))}, "
              f"routing NMI {result['eval']['routing'].get('nmi', float('nan')):.3f}, "
              f"{result['minutes']:.1f} min", flush=True)
    meta["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    save(True)
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
