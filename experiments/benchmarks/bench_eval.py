"""Wall time of ``midol eval`` (issue: the shared-data suite, 3 tiny-Swin backbones, kNN +
linear + few-shot with 5 seeds, in at most 10 minutes on 2 CPU cores with a warm feature cache
and 20 from a cold one).

Backbones: the demo's M-IDoL teacher and the demo DINO baseline's teacher (run ``make demo``
and ``midol fit --config configs/pretrain/demo_dino_baseline.yaml`` first), plus the random
init of their tiny Swin that ``midol eval`` adds by itself. Run from the repository root:

    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/bench_eval.py \
        --out experiments/results/bench_eval_cpu.md

The cold pass starts from an empty cache folder; the warm pass reruns the same command. The
results file records the machine's load average before and after, since a shared machine
slows both passes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BACKBONES = ["midol=outputs/demo/teacher_backbone.safetensors",
                     "dino=outputs/demo_dino_baseline/teacher_backbone.safetensors"]


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    parser.add_argument("--suite", default="configs/eval/shared_data.yaml")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core budget)")
    parser.add_argument("--out", default="experiments/results/bench_eval_cpu.md")
    ns = parser.parse_args()
    for spec in ns.backbones:
        path = spec.split("=", 1)[-1]
        if not (REPO / path).exists():
            sys.exit(f"bench_eval: {path} is missing: run `make demo` and "
                     "`midol fit --config configs/pretrain/demo_dino_baseline.yaml` first")
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    passes = []
    try:
        for name in ("cold", "warm"):
            cmd = [str(REPO / ".venv" / "bin" / "midol"), "eval", "--suite", ns.suite,
                   "--backbones", *ns.backbones, "--baseline", "dino", "--out", str(work / name),
                   "--cache_dir", str(work / "cache"), "--threads", str(ns.threads)]
            before = _load()
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"bench_eval: {name} pass failed:\n{proc.stderr[-3000:]}")
            report = json.loads((work / name / "report.json").read_text())
            passes.append({"pass": name, "seconds": seconds, "load_before": before,
                           "load_after": _load(), "features": report["provenance"]["features"],
                           "scores": sum(1 for _ in open(work / name / "runs.csv")) - 1,
                           "command": " ".join(cmd[1:]).replace(str(work), "$TMP")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# `midol eval` wall time on CPU", "",
             f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; "
             f"device: CPU ({platform.machine()}, {os.cpu_count()} cores), torch threads {ns.threads}, "
             "0 data workers.",
             f"- Suite: `{ns.suite}` (9 tasks, ~9,700 images); backbones: "
             f"{', '.join(f'`{b}`' for b in ns.backbones)} + the random init of their tiny Swin "
             "(added by midol eval); protocols knn (k 10, 20), linear, fewshot (shots 1/5/10/25, "
             "fractions 0.01/0.1, 5 draws); 1000 bootstrap resamples.",
             "- Command (`$TMP` a fresh folder; the warm pass reruns it with the cache filled):",
             f"  `{passes[0]['command']}`", "",
             "| pass | wall time | images embedded | from cache | scores | load average before | after |",
             "|---|---|---|---|---|---|---|"]
    for p in passes:
        lines.append(f"| {p['pass']} | {p['seconds'] / 60:.1f} min ({p['seconds']:.0f} s) | "
                     f"{p['features']['computed']} | {p['features']['reused']} | {p['scores']} | "
                     f"{p['load_before']} | {p['load_after']} |")
    lines += ["", "Budget (issue): warm at most 10 min, cold at most 20 min on 2 cores. A load average "
              "above 2 means other jobs shared the cores during the pass."]
    out = REPO / ns.out
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
