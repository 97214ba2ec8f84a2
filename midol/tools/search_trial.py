"""One trial of ``midol search``: its ``midol fit`` run in a subprocess, and the best value of
the metric over the run's validations (its CSVLogger's metrics.csv), not the last."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TrialError(Exception):
    """A trial that ran but gives no score; the message is its one-line reason."""


class MetricMissing(TrialError):
    """The run ended but never logged the metric: every trial would fail alike (stops the search)."""


@dataclass
class TrialRun:
    """One trial: its number, every swept option's value, the ``midol fit`` arguments that set
    them, the run folder, and the metrics.csv column to read."""

    number: int
    overrides: dict[str, Any]
    argv: list[str]  # after "midol": fit --config ... --trainer.default_root_dir FOLDER
    folder: Path
    metric: str


@dataclass
class Validation:
    epoch: int | None
    step: int | None
    value: float


def read_history(path: Path, metric: str) -> list[Validation]:
    """Every logged value of ``metric`` in a CSVLogger's metrics.csv, in order."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        if metric not in columns:
            logged = ", ".join(c for c in columns if c.startswith("val")) or ", ".join(columns)
            raise MetricMissing(f"metric {metric} was not logged ({path} has {logged}); set the "
                                "sweep file's metric.name to one of these")
        out = []
        for row in reader:
            text = (row.get(metric) or "").strip()
            if not text:
                continue
            out.append(Validation(_whole(row, "epoch"), _whole(row, "step"), float(text)))
    return out


def _whole(row: dict[str, Any], key: str) -> int | None:
    value = (row.get(key) or "").strip()
    return int(float(value)) if value else None


def best_of(history: list[Validation], goal: str) -> Validation:
    """The best finite value of a run's validations (max for maximize, min for minimize; the
    earliest of ties), not the last."""
    finite = [v for v in history if math.isfinite(v.value)]
    if not finite:
        raise TrialError(f"no finite value in {len(history)} validation(s)" if history
                         else "the run logged no validation")
    pick = max if goal == "maximize" else min
    return pick(finite, key=lambda v: v.value)


def error_line(log: Path, code: int) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [ln for ln in lines if ln]
    said = [ln for ln in lines if ln.startswith("midol: ")]
    text = said[-1] if said else (lines[-1] if lines else "no output")
    return f"midol fit exited with status {code}: {text[:300]}"


def run_trial(run: TrialRun) -> list[Validation]:
    """Runs the trial's ``midol fit`` and returns the history of ``run.metric``.

    A subprocess, not :func:`midol.lightning_cli.run_lightning` in this process: a fit leaves
    state behind (the global seed and RNGs, torch's thread count, warning filters, CUDA memory
    held until collected, Lightning's signal handlers), and a trial that crashes the interpreter
    (out of memory, a segfault in a data worker) would end the whole search. The price, importing
    torch and Lightning again, is seconds against a training run."""
    run.folder.mkdir(parents=True, exist_ok=True)
    log = run.folder / "fit.log"
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "midol", *run.argv], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: stop the fit too (it saves last.ckpt)
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if code != 0:
        raise TrialError(error_line(log, code))
    found = sorted(run.folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TrialError(f"no metrics.csv under {run.folder}: midol search reads the validations "
                         "from a CSVLogger whose save_dir is under trainer.default_root_dir "
                         "(set --trainer.logger lightning.pytorch.loggers.CSVLogger after --)")
    return read_history(found[-1], run.metric)
