"""MedMIX study on ODIR patients: MedMIX vs single inputs vs fusion baselines, the structural
ablation, every missing-input protocol, on the same patients, splits and masks.

Settings come from configs/fusion/medmix_odir.yaml (experts: midol's demo-scale M-IDoL and
DINO-baseline exports + a random ResNet-18; teacher: the DINO export at 128 px); each row
changes only what it names. Per training seed: fit on the train split, keep the epoch with the
best validation macro AUC, score the test split under every protocol (mask seeds 0, 1, 2, the
same for every row). Needs the two demo exports (README, MedMIX section). Run from the
repository root:

    OMP_NUM_THREADS=2 python experiments/medmix/run_medmix_study.py --out experiments/results/medmix_odir_<date>.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from midol.analysis.plotting import new_figure, save_figure  # noqa: E402
from midol.analysis.robustness import Protocols, evaluate  # noqa: E402
from midol.config_compose import load_composed  # noqa: E402
from midol.data.patient_datamodule import PatientDataModule  # noqa: E402
from midol.fusion.export import inference_cost  # noqa: E402
from midol.fusion.module import MedMIX  # noqa: E402

PRESET = REPO / "configs/fusion/medmix_odir.yaml"
INPUTS = ["left_fundus", "right_fundus", "demographics"]
# row -> (model overrides, inputs kept); None keeps all three inputs
ROWS: dict[str, tuple[dict[str, Any], list[str] | None]] = {
    "medmix": ({}, None),
    "left_eye_only": ({}, ["left_fundus"]),
    "right_eye_only": ({}, ["right_fundus"]),
    "demographics_only": ({"teachers": None}, ["demographics"]),
    "mean_fusion": ({"fusion": "mean"}, None),
    "concat_missing": ({"fusion": "concat_missing"}, None),
    "one_expert": ({"experts": "first"}, None),
    "no_teacher": ({"teachers": None}, None),
    # issue 26's counter-measure to labels that predict missingness (rows added 2026-12-07)
    "missingness_balance": ({"missingness_balance": True, "negative_labels": ["N"]}, None),
    "concat_missing_balanced": ({"fusion": "concat_missing", "missingness_balance": True,
                                 "negative_labels": ["N"]}, None),
}
MULTI_INPUT = [r for r, (_, keep) in ROWS.items() if keep is None]


def build(row: str, preset: dict[str, Any], work: Path) -> tuple[MedMIX, PatientDataModule]:
    overrides, keep = ROWS[row]
    model_args = copy.deepcopy(preset["model"]["init_args"])
    data_args = copy.deepcopy(preset["data"]["init_args"])
    for key, value in overrides.items():
        if key == "experts" and value == "first":
            model_args["experts"] = {m: specs[:1] for m, specs in model_args["experts"].items()}
        else:
            model_args[key] = value
    if keep is not None:
        data_args["inputs"] = [s for s in data_args["inputs"] if s["name"] in keep]
    model_args["cache_dir"] = str(work / "feature_cache")
    return MedMIX(**model_args), PatientDataModule(**data_args)


def fit_and_score(row: str, seed: int, preset: dict[str, Any], work: Path, protocols: Protocols,
                  epochs: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, dm = build(row, preset, work)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / row / f"seed{seed}", filename="best",
                                               monitor="val/auc", mode="max", save_top_k=1,
                                               enable_version_counter=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        scores = evaluate(model, row, model.table.rows("test"), protocols)
    best_epoch = int(torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["epoch"])
    return {"row": row, "seed": seed, "best_val_auc": float(ckpt.best_model_score),
            "best_epoch": best_epoch, "fit_s": time.time() - start,
            "scores": [s.__dict__ for s in scores], "model": model}


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[float, float, int, int]]:
    """(row, protocol, setting) -> (mean over training seeds, std, seeds, patients)."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    patients: dict[tuple[str, str, str], int] = {}
    for run in runs:
        for s in run["scores"]:
            key = (run["row"], s["protocol"], s["setting"])
            groups.setdefault(key, []).append(s["macro_auc"])
            patients[key] = s["patients"]
    return {k: (float(np.nanmean(v)), float(np.nanstd(v)), len(v), patients[k]) for k, v in groups.items()}


COLUMNS = [("sweep", "0", "all inputs (q=0)"), ("sweep", "0.3", "q=0.3"), ("sweep", "0.6", "q=0.6"),
           ("drop_input", "left_fundus", "no left eye"), ("drop_input", "right_fundus", "no right eye"),
           ("drop_input", "demographics", "no demographics"),
           ("not_at_random", "left_fundus", "NAR left"), ("not_at_random", "right_fundus", "NAR right"),
           ("natural_incomplete", "some input missing", "one-eyed patients"),
           ("complete", "all inputs present", "two-eyed patients")]


def cell(stats: dict, key: tuple[str, str, str]) -> str:
    row, protocol, setting = key
    single = ROWS[row][1] is not None
    # one input: nothing can be dropped (a patient keeps at least one input), so only q=0 is a result
    if key not in stats or (single and (protocol, setting) != ("sweep", "0")):
        return "–"
    mean, std, _, _ = stats[key]
    return f"{mean:.3f} ± {std:.3f}"


def plot(stats: dict, rates: tuple[float, ...], path: Path) -> None:
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for row in MULTI_INPUT:
        y = np.array([stats[(row, "sweep", f"{q:g}")][0] for q in rates])
        e = np.array([stats[(row, "sweep", f"{q:g}")][1] for q in rates])
        (line,) = ax.plot(rates, y, marker="o", label=row)
        ax.fill_between(rates, y - e, y + e, color=line.get_color(), alpha=0.12)
    for row in ("left_eye_only", "right_eye_only", "demographics_only"):
        if (row, "sweep", "0") in stats:
            ax.axhline(stats[(row, "sweep", "0")][0], linestyle=":", linewidth=1, color="grey")
            ax.annotate(row, (rates[-1], stats[(row, "sweep", "0")][0]), fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("test-time drop rate per input")
    ax.set_ylabel("macro AUC (test, mean over 3 training seeds)")
    ax.set_title("ODIR patients: robustness to missing inputs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def missingness_lines(runs: list[dict[str, Any]], rows: list[str]) -> list[str]:
    """Per row and eye: the AUC gain when that eye goes missing mostly for abnormal patients
    (midol robustness's check: paired bootstrap over test patients), mean over training seeds,
    and in how many seeds the 95% CI lay above 0 (the model read the label from missingness)."""
    out = ["", "Does the model read the label from missingness? AUC gain under the not-at-random drop "
           "over the natural inputs, same patients (mean ± std over training seeds; flagged: seeds "
           "whose 95% bootstrap CI over patients lies above 0):", "",
           "| row | eye | AUC gain | flagged seeds |", "|---|---|---:|---:|"]
    for row in rows:
        for eye in ("left_fundus", "right_fundus"):
            found = [s for r in runs if r["row"] == row for s in r["scores"]
                     if s["protocol"] == "not_at_random" and s["setting"] == eye and s.get("gain") is not None]
            if not found:
                continue
            gains = [s["gain"] for s in found]
            flagged = sum(bool(s["reads_missingness"]) for s in found)
            out.append(f"| {row} | {eye} | {np.mean(gains):+.4f} ± {np.std(gains):.4f} | "
                       f"{flagged} / {len(found)} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results Markdown file")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's max_epochs")
    parser.add_argument("--work", default="outputs/medmix_study", help="checkpoints and feature cache")
    ns = parser.parse_args()
    preset = load_composed(PRESET)
    epochs = ns.epochs or int(preset["trainer"]["max_epochs"])
    work = Path(ns.work)
    protocols = Protocols(seeds=(0, 1, 2))
    out = Path(ns.out)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = []
    for row in ns.rows:
        for seed in ns.seeds:
            run = fit_and_score(row, seed, preset, work, protocols, epochs)
            print(f"{row} seed {seed}: best val AUC {run['best_val_auc']:.3f} (epoch {run['best_epoch']}), "
                  f"test AUC {run['scores'][0]['macro_auc']:.3f}, {run['fit_s']:.0f} s", flush=True)
            runs.append(run)
    cost = inference_cost(next(r["model"] for r in runs if r["row"] == "medmix")) if "medmix" in ns.rows else None
    stats = aggregate(runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    import os

    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')} python " + " ".join(sys.argv)
    lines = [
        "# MedMIX on ODIR patients: fusion vs single inputs, baselines and ablations",
        "",
        f"* Date: {started:%Y-%m-%d} (UTC); commit {commit}; device: CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}",
        f"* Command: `{command}`",
        f"* Settings: {PRESET.relative_to(REPO)} ({epochs} epochs; the epoch with the best validation macro "
        "AUC is kept); each row changes only what it names. Experts per eye: midol demo-scale M-IDoL "
        "export, DINO-baseline export (both `make demo`-scale tiny Swins at 64 px, pre-trained on the "
        "bundled sample corpus, not on ODIR), random ResNet-18. Teacher: the DINO export at 128 px.",
        "* Data: ../shared/data/fundus/odir_patients, split column (train 1120 / val 160 / test 320); "
        "single-input rows keep the patients who have that input (counts in the table).",
        f"* Numbers: test macro AUC over the 8 labels, mean ± std over training seeds {ns.seeds}; each "
        "value that draws masks (sweep, not-at-random) is itself the mean over mask seeds 0, 1, 2, the "
        "same masks for every row. NAR: an eye dropped with p=0.6 for patients with any abnormal label "
        "(not N), p=0.1 otherwise.",
        "",
        "| row | patients | " + " | ".join(c[2] for c in COLUMNS) + " | best val AUC |",
        "|---|---:|" + "---:|" * len(COLUMNS) + "---:|",
    ]
    for row in ns.rows:
        val = [r["best_val_auc"] for r in runs if r["row"] == row]
        patients = stats[(row, "sweep", "0")][3]
        lines.append(f"| {row} | {patients} | " + " | ".join(cell(stats, (row, p, s)) for p, s, _ in COLUMNS)
                     + f" | {np.mean(val):.3f} ± {np.std(val):.3f} |")
    lines += ["", "Full test-time sweep (macro AUC, mean ± std over training seeds):", "",
              "| row | " + " | ".join(f"q={q:g}" for q in protocols.rates) + " |",
              "|---|" + "---:|" * len(protocols.rates)]
    for row in ns.rows:
        if ROWS[row][1] is None:
            lines.append(f"| {row} | " + " | ".join(cell(stats, (row, "sweep", f"{q:g}")) for q in protocols.rates) + " |")
    lines += missingness_lines(runs, ns.rows)
    if cost:
        lines += ["", "Inference cost of the deployable MedMIX model (experts + fusion network, no teacher) vs "
                  "the same pass plus the training-only teacher path, CPU, synthetic patients with every "
                  "input present:", "", "```", json.dumps(cost, indent=1), "```"]
    png = out.with_suffix(".png")
    if all(r in ns.rows for r in MULTI_INPUT):
        plot(stats, tuple(protocols.rates), png)
        lines += ["", f"![macro AUC vs drop rate]({png.name})"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    raw = {"runs": [{k: v for k, v in r.items() if k != "model"} for r in runs], "inference_cost": cost,
           "command": command, "commit": commit, "date": f"{started:%Y-%m-%d}"}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
