"""The studies' probes, scored by midol eval: one entry point for experiments/ablations,
experiments/dex and the frozen-probe tasks of experiments/downstream.

Every study used to carry its own probe (its own tasks, metric, split rule and no uncertainty).
They now call :func:`score`, which runs ``midol eval``'s own code (``midol.evaluation``: suite,
backbones by spec, feature cache, kNN / linear protocols, bootstrap CIs, paired comparisons
against the seeded random init of each architecture, ``report.write``) and returns the
``report.json`` it wrote beside ``report.md`` and ``runs.csv``. :func:`digest` keeps the numbers
a study table shows (mean and 95 % CI per task, paired differences with their verdicts), and
:func:`ci_cell` / :func:`verdict_cell` print them as the report does.

The shared suite is ``configs/eval/shared_data.yaml``; its MedMNIST tasks
(:data:`HELDOUT_TASKS`) are not in the pre-training corpus of the small studies
(``experiments/ablations/shared_data.yaml``) and are scored and reported apart from the other
(``corpus``) tasks, whose images the pre-training saw without labels.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "configs" / "eval" / "shared_data.yaml"
CACHE_DIR = REPO / "outputs" / "eval_cache"
# MedMNIST tasks of SUITE: not in the corpus of experiments/ablations/shared_data.yaml.
HELDOUT_TASKS: tuple[str, ...] = ("pneumoniamnist", "retinamnist")
GROUPS = ("heldout", "corpus")
LINEAR = "linear full"
RANDOM_INIT = "random init"


def study_options(protocols: str | Sequence[str] = "knn,linear", knn_k: Sequence[int] = (20,),
                  bootstrap: int = 1000, metric: str = "auc", baseline: str | None = None) -> Any:
    """midol eval's :class:`~midol.evaluation.runner.Options` for a study: full-data kNN and
    linear probes by default (``fewshot`` may be named too), 1000 bootstrap resamples."""
    from midol.evaluation.runner import Options

    names = [p.strip() for p in protocols.split(",")] if isinstance(protocols, str) else list(protocols)
    return Options(protocols=[p for p in names if p], knn_k=list(knn_k), bootstrap=bootstrap,
                   metric=metric, baseline=baseline)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out + (" (with uncommitted changes)" if dirty else "")


def score(backbones: Sequence[str | tuple[str, str]], out: str | os.PathLike[str], *,
          suite: Any = SUITE, tasks: Sequence[str] | None = None, options: Any = None,
          reference_seed: int = 0, cache_dir: str | os.PathLike[str] = CACHE_DIR,
          device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
          data_root: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Score ``backbones`` with midol eval on ``suite`` and write its report into ``out``.

    Args:
        backbones: midol eval backbone specs (``[LABEL=]SPEC``: ``last.ckpt``,
            ``last.ckpt:director``, ``export/``, ``random:NAME,k=v``, ...) or ``(label, spec)``
            pairs (a label may then hold any characters).
        out: Folder of ``report.md``, ``report.json`` and ``runs.csv``.
        suite: A suite file or a :class:`~midol.evaluation.suite.Suite`.
        tasks: Only these tasks of the suite.
        options: :class:`~midol.evaluation.runner.Options` (default :func:`study_options`).
        reference_seed: Seed of the random init added for every architecture that has no
            random-init backbone among ``backbones`` (midol eval itself uses 0; a study passes
            its pre-training seed).
        cache_dir: midol eval's feature cache.

    Returns:
        The report as written to ``out/report.json`` (plus ``"report_md"``, its path).
    """
    import midol
    from midol.evaluation import features as feats
    from midol.evaluation import report
    from midol.evaluation.runner import EvalWarning, evaluate
    from midol.evaluation.suite import Suite, load_suite

    options = options or study_options()
    if not isinstance(suite, Suite):
        suite = load_suite(suite, data_root, list(tasks) if tasks else None)
    elif tasks:
        suite = Suite(suite.name, [t for t in suite.tasks if t.name in tasks], suite.data_root,
                      suite.image_size, suite.description, suite.path)
    refs = []
    for item in backbones:
        if isinstance(item, tuple):
            label, text = item
            refs.append(feats.with_label(feats.parse_backbone(text), label))
        else:
            refs.append(feats.parse_backbone(item))
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"backbone labels must be unique, got {labels}")
    if options.baseline is not None and options.baseline not in labels:
        raise ValueError(f"baseline {options.baseline!r} is not one of the backbones {labels}")
    loaded = feats.add_references([feats.load(r) for r in refs], seed=reference_seed)
    embedder = feats.Embedder(str(cache_dir), device, batch_size, num_workers)
    start = dt.datetime.now(dt.timezone.utc)
    with warnings.catch_warnings():
        warnings.simplefilter("always", EvalWarning)
        results = evaluate(suite, loaded, embedder, options, options.baseline)
    seconds = (dt.datetime.now(dt.timezone.utc) - start).total_seconds()
    provenance: dict[str, Any] = {
        "suite": suite.name, "suite_file": suite.path or "(built by the study)",
        "date": start.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "python " + shlex.join(sys.argv),
        "commit": _commit(), "midol": midol.__version__,
        "device": device if device != "cpu" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "cache_dir": str(cache_dir), "seconds": round(seconds, 1),
        "features": {"computed": embedder.computed, "reused": embedder.reused},
        "backbones": feats.provenance_rows(loaded),
    }
    path = report.write(out, results, options, provenance)
    written: dict[str, Any] = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    written["report_md"] = str(path)
    return written


def score_groups(backbones: Sequence[str | tuple[str, str]], out: str | os.PathLike[str],
                 heldout: Sequence[str] = HELDOUT_TASKS, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """:func:`score` twice on the shared suite, the held-out tasks apart from the corpus ones
    (their own pooled verdicts): ``{"heldout": digest, "corpus": digest}``, reports in
    ``out/heldout`` and ``out/corpus``."""
    from midol.evaluation.suite import load_suite

    suite = load_suite(kwargs.pop("suite", SUITE), kwargs.pop("data_root", None))
    names = [t.name for t in suite.tasks]
    missing = sorted(set(heldout) - set(names))
    if missing:
        raise ValueError(f"held-out task(s) {missing} are not in suite {suite.path}")
    split = {"heldout": [n for n in names if n in heldout], "corpus": [n for n in names if n not in heldout]}
    return {group: digest(score(backbones, Path(out) / group, suite=suite, tasks=split[group], **kwargs))
            for group in GROUPS if split[group]}


# ------------------------------------------------------------------------------ read-outs


def digest(report: Mapping[str, Any], metric: str | None = None) -> dict[str, Any]:
    """What a study table shows from a report: per setting, row and task the ``metric``
    (default: the primary one) as mean, sd and 95 % CI, the mean over tasks, and the paired
    comparisons (against the random init and the baseline, per task and pooled)."""
    metric = metric or report["options"]["metric"]
    tasks = list(report["tasks"])
    rows = [r["key"] for r in report["rows"]]
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for s in report["summaries"]:
        if s["metric"] != metric:
            continue
        cell = {k: s[k] for k in ("mean", "sd", "lo", "hi")}
        scores.setdefault(s["setting"], {}).setdefault(s["row"], {})[s["task"]] = cell
    for by_row in scores.values():
        for by_task in by_row.values():
            means = [by_task[t]["mean"] for t in tasks if t in by_task]
            by_task["mean"] = {"mean": float(sum(means) / len(means)) if means else float("nan")}
    comparisons: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for c in report["comparisons"]:
        if c["metric"] != metric:
            continue
        kind = "vs_random" if c["kind"] == RANDOM_INIT else "vs_baseline"
        comparisons.setdefault(kind, {}).setdefault(c["setting"], {}).setdefault(c["row"], {})[c["task"]] = {
            k: c.get(k) for k in ("against", "diff", "lo", "hi", "p", "verdict", "note")}
    return {"report": report.get("report_md", ""), "metric": metric, "tasks": tasks, "rows": rows,
            "references": [r["key"] for r in report["rows"] if r["reference"]],
            "baseline": report["options"].get("baseline"),
            "seconds": report["provenance"].get("seconds"), "scores": scores,
            "vs_random": comparisons.get("vs_random", {}), "vs_baseline": comparisons.get("vs_baseline", {})}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ci_cell(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` (the mean alone for a mean over tasks); ``—`` when absent."""
    if not cell:
        return "—"
    if "lo" not in cell:
        return _fmt(cell["mean"], digits)
    return f"{_fmt(cell['mean'], digits)} [{_fmt(cell['lo'], digits)}, {_fmt(cell['hi'], digits)}]"


def verdict_cell(c: Mapping[str, Any] | None) -> str:
    """``verdict (+diff [lo, hi])`` of a paired comparison; ``—`` when absent."""
    if not c or c.get("diff") is None or math.isnan(c["diff"]):
        return "—"
    return f"{c['verdict']} ({c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}])"


def cell(d: Mapping[str, Any], row: str, task: str = "mean", setting: str = LINEAR) -> dict[str, Any] | None:
    """One score of a :func:`digest` (``task="mean"``: the mean over its tasks)."""
    return d["scores"].get(setting, {}).get(row, {}).get(task)


def versus(d: Mapping[str, Any], row: str, task: str = "(suite)", setting: str = LINEAR,
           kind: str = "vs_random") -> dict[str, Any] | None:
    """One paired comparison of a :func:`digest` (``task="(suite)"``: pooled over its tasks)."""
    return d[kind].get(setting, {}).get(row, {}).get(task)


def method_text(options: Any, metric_label: str = "AUC") -> str:
    """The probing protocol in one sentence, for a results file's header."""
    parts = []
    if "linear" in options.protocols:
        parts.append("L2 logistic regression on standardised frozen features (C chosen by "
                     "validation log-loss, inner 3-fold CV where the task has no validation split)")
    if "knn" in options.protocols:
        parts.append(f"DINO weighted kNN (k = {', '.join(map(str, options.knn_k))}, T = "
                     f"{options.knn_temperature:g})")
    if "fewshot" in options.protocols:
        parts.append("few-shot linear probes on seeded draws")
    return ("midol eval (" + "; ".join(parts) + f"); {metric_label} on each task's test split "
            f"with its 95 % CI ({options.bootstrap} stratified bootstrap resamples); split rules "
            "and paired verdicts (same test samples and resamples) as in midol eval's report")
