"""Eval study (experiments/eval_study/rows.yaml, fixed 2026-12-07 before any result): pre-train
every (row, seed) with `midol fit`, one run at a time, seed-major, then score the frozen
backbones with `midol eval` on the primary (held-out MedMNIST) and secondary (shared-data)
suites, and write experiments/results/eval_study_2026-12-07.md.

Run from the repository root (resumable: finished runs are skipped; a run folder without a
finished last.ckpt is trained again with --overwrite true):

    OMP_NUM_THREADS=1 nohup .venv/bin/python experiments/eval_study/run_study.py > outputs/eval_study/study.log 2>&1 &

Options: --only ROW:SEED (train one run, e.g. the timing run midol:0), --no-eval, --eval-only,
--no-commit, --seeds 0,1 (a subset). After every complete seed round the evals run on every
finished run and the results file (+ each eval's report.json / runs.csv under
experiments/results/eval_study_2026-12-07/) is rewritten and committed (only this study's files).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ROWS = REPO / "experiments/eval_study/rows.yaml"
OUT = Path("outputs/eval_study")
RESULTS_MD = Path("experiments/results/eval_study_2026-12-07.md")
RESULTS_DIR = Path("experiments/results/eval_study_2026-12-07")
MIDOL = str(REPO / ".venv/bin/midol")
STUDY_FILES = ["experiments/eval_study/rows.yaml", "experiments/eval_study/run_study.py",
               "experiments/eval_study/report.py", "configs/eval/heldout_medmnist.yaml"]


def log(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


def cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def run_dir(row: str, seed: int) -> Path:
    return OUT / row / f"seed{seed}"


def expected_steps(study: dict[str, Any], row: dict[str, Any]) -> int:
    fam = study["families"][row["family"]]
    batch = (row.get("data") or {}).get("batch_size", 32)
    return fam["max_epochs"] * (640 // batch)


def fit_command(study: dict[str, Any], row: dict[str, Any], seed: int, overwrite: bool) -> list[str]:
    fam = study["families"][row["family"]]
    cmd = [MIDOL, "fit"]
    for c in fam["configs"]:
        cmd += ["--config", c]
    cmd += ["--seed_everything", str(seed), "--trainer.max_epochs", str(fam["max_epochs"]),
            "--trainer.default_root_dir", str(run_dir(row["name"], seed)),
            "--trainer.logger.init_args.save_dir", str(run_dir(row["name"], seed)),
            "--data.init_args.num_workers", "1", "--trainer.enable_progress_bar", "false",
            "--threads", "1"]
    for k, v in (row.get("model") or {}).items():
        cmd += [f"--model.init_args.{k}", cli_value(v)]
    for k, v in (row.get("data") or {}).items():
        cmd += [f"--data.init_args.{k}", cli_value(v)]
    if overwrite:
        cmd += ["--overwrite", "true"]
    return cmd


def finished(study: dict[str, Any], row: dict[str, Any], seed: int) -> bool:
    """A run is finished when run.json says so and its last.ckpt holds the expected step."""
    d = run_dir(row["name"], seed)
    info = d / "run.json"
    ckpt = d / "checkpoints" / "last.ckpt"
    if not (info.is_file() and ckpt.is_file()):
        return False
    meta = json.loads(info.read_text())
    return meta.get("status") == "done" and meta.get("global_step") == expected_steps(study, row)


def ckpt_step(ckpt: Path) -> int | None:
    import torch

    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable checkpoint is simply not finished
        return None


def train(study: dict[str, Any], row: dict[str, Any], seed: int) -> dict[str, Any]:
    d = run_dir(row["name"], seed)
    overwrite = (d / "checkpoints").exists()  # a folder without a finished last.ckpt
    cmd = fit_command(study, row, seed, overwrite)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shown = "OMP_NUM_THREADS=1 " + shlex.join([".venv/bin/midol", *cmd[1:]])
    log(f"train {row['name']} seed {seed}: {shown}")
    load_before = os.getloadavg()
    start = time.time()
    with open(d / "fit.log", "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    step = ckpt_step(d / "checkpoints" / "last.ckpt") if rc == 0 else None
    meta = {"row": row["name"], "seed": seed, "command": shown, "returncode": rc,
            "status": "done" if rc == 0 and step == expected_steps(study, row) else "failed",
            "global_step": step, "expected_steps": expected_steps(study, row),
            "wall_seconds": round(seconds, 1), "minutes": round(seconds / 60, 2),
            "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores shared with other jobs, "
                      "1 torch thread, 1 data worker"}
    (d / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    with open(OUT / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(meta) + "\n")
    log(f"{row['name']} seed {seed}: {meta['status']} (rc {rc}, step {step}) in {seconds / 60:.1f} min")
    return meta


def backbone_specs(study: dict[str, Any], names: list[str], seeds: list[int]) -> list[str]:
    rows = {r["name"]: r for r in study["rows"]}
    specs = []
    for name in names:
        row = rows[name]
        for s in seeds:
            if not finished(study, row, s):
                continue
            ckpt = run_dir(name, s) / "checkpoints" / "last.ckpt"
            if row.get("parts"):
                specs += [f"{name}_{p}@{s}={ckpt}:{p}" for p in row["parts"]]
            else:
                specs.append(f"{name}@{s}={ckpt}")
    return specs


def run_evals(study: dict[str, Any], seeds: list[int], only: set[str] | None = None) -> list[dict[str, Any]]:
    """Every eval of rows.yaml on every finished run; returns what ran (for the report).
    ``only``: re-run just these evals (names in rows.yaml); the others' last results are reused."""
    ev = study["eval"]
    done = []
    for e in ev["evals"]:
        if only is not None and e["name"] not in only:
            for suite_key in e["suites"]:
                out = OUT / "eval" / f"{e['name']}_{suite_key}"
                dest = RESULTS_DIR / f"{e['name']}_{suite_key}"
                if (out / "report.json").is_file() and (dest / "report.json").is_file():
                    done.append({"name": e["name"], "suite": suite_key, "suite_file": ev["suites"][suite_key],
                                 "rc": 0, "command": "(reused from an earlier round)", "minutes": None,
                                 "out": str(out), "baseline": e["baseline"],
                                 "n_backbones": None, "copied_to": str(dest)})
            continue
        specs = backbone_specs(study, e["rows"], seeds)
        others = [r for r in e["rows"] if r != e["baseline"]]
        if not backbone_specs(study, others, seeds) or not backbone_specs(study, [e["baseline"]], seeds):
            continue  # no baseline run yet, or nothing to compare with it
        for suite_key in e["suites"]:
            suite = ev["suites"][suite_key]
            out = OUT / "eval" / f"{e['name']}_{suite_key}"
            cmd = [MIDOL, "eval", "--suite", suite, "--backbones", *specs, "--out", str(out),
                   *ev["options"], "--baseline", e["baseline"]]
            if e.get("random_references") is False:
                cmd += ["--random_references", "false"]
            shown = "OMP_NUM_THREADS=1 " + shlex.join([".venv/bin/midol", *cmd[1:]])
            log(f"eval {e['name']} {suite_key}: {len(specs)} backbones")
            start = time.time()
            with open(OUT / "eval" / f"{e['name']}_{suite_key}.log", "w") as fh:
                rc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                    stdout=fh, stderr=subprocess.STDOUT).returncode
            seconds = time.time() - start
            log(f"eval {e['name']} {suite_key}: rc {rc} in {seconds / 60:.1f} min")
            item = {"name": e["name"], "suite": suite_key, "suite_file": suite, "rc": rc,
                    "command": shown, "minutes": round(seconds / 60, 2), "out": str(out),
                    "baseline": e["baseline"], "n_backbones": len(specs)}
            if rc == 0:
                dest = RESULTS_DIR / f"{e['name']}_{suite_key}"
                dest.mkdir(parents=True, exist_ok=True)
                for f in ("report.json", "runs.csv", "report.md"):
                    shutil.copy2(out / f, dest / f)
                item["copied_to"] = str(dest)
            done.append(item)
    return done


def commit(message: str, evals: list[dict[str, Any]]) -> None:
    """Commit this study's own files only: the scripts, the results file and the report.json /
    runs.csv / report.md each eval of this round copied (never the whole results folder, where
    other sessions may keep files of their own)."""
    copied = [Path(e["copied_to"]) / f for e in evals if e.get("copied_to")
              for f in ("report.json", "runs.csv", "report.md")]
    paths = [p for p in STUDY_FILES if Path(p).exists()] + [str(RESULTS_MD)] + [str(c) for c in copied]
    for _attempt in range(12):
        add = subprocess.run(["git", "add", "--", *paths], cwd=REPO, capture_output=True, text=True)
        if add.returncode == 0:
            break
        if "index.lock" not in add.stderr:
            log(f"git add failed: {add.stderr.strip()}")
            return
        time.sleep(5)
    for _attempt in range(12):
        res = subprocess.run(["git", "commit", "-m", message, "--", *paths], cwd=REPO,
                             capture_output=True, text=True)
        if res.returncode == 0 or "nothing to commit" in res.stdout + res.stderr:
            log(f"commit: {(res.stdout.strip().splitlines() or [''])[0]}")
            return
        if "index.lock" not in res.stderr:
            log(f"git commit failed: {res.stderr.strip()}")
            return
        time.sleep(5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="ROW:SEED: train this one run and stop")
    p.add_argument("--seeds", default=None, help="comma-separated subset of rows.yaml's seeds")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="run the evals and the report now")
    p.add_argument("--no-commit", action="store_true")
    p.add_argument("--evals", default=None, help="with --eval-only: re-run only these evals (comma-"
                   "separated names of rows.yaml), reusing the others' last results")
    ns = p.parse_args()
    os.chdir(REPO)
    study = yaml.safe_load(ROWS.read_text())
    rows = {r["name"]: r for r in study["rows"]}
    assert sorted(study["order"]) == sorted(rows), "order must name every row once"
    seeds = [int(s) for s in ns.seeds.split(",")] if ns.seeds else list(study["seeds"])
    (OUT / "eval").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    if ns.only:
        name, seed = ns.only.split(":")
        if not finished(study, rows[name], int(seed)):
            train(study, rows[name], int(seed))
        return 0

    def evaluate_and_report(label: str) -> None:
        import importlib

        import report  # experiments/eval_study/report.py, reloaded each round: fixes apply

        importlib.reload(report)
        only = set(ns.evals.split(",")) if ns.evals else None
        evals = run_evals(study, list(study["seeds"]), only)
        report.write(study, evals, RESULTS_MD, RESULTS_DIR)
        if not ns.no_commit:
            commit(f"Eval study ({label}): midol eval of every finished run, "
                   "experiments/results/eval_study_2026-12-07.md", evals)

    if ns.eval_only:
        evaluate_and_report("evals re-run")
        return 0
    for s in seeds:
        trained = False
        for name in study["order"]:
            if finished(study, rows[name], s):
                continue
            meta = train(study, rows[name], s)
            trained = True
            if meta["status"] != "done":
                log(f"{name} seed {s} did not finish: see {run_dir(name, s)}/fit.log; continuing")
        complete = all(finished(study, rows[n], s) for n in study["order"])
        log(f"seed {s}: {'complete' if complete else 'INCOMPLETE'}")
        if not ns.no_eval and (trained or not (RESULTS_DIR / "swin_primary").exists()):
            evaluate_and_report(f"seed round {s} {'complete' if complete else 'incomplete'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
