"""The report card of ``midol eval``: ``report.md``, ``report.json``, ``runs.csv`` and the
label-efficiency figures, written into a staging folder and moved into ``--out`` only when
everything is written (a failed run leaves nothing half-written there)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from midol.analysis.plotting import new_figure, save_figure
from midol.evaluation import stats
from midol.evaluation.runner import Options, Results, Row, Setting

RUN_FIELDS = ["task", "row", "backbone", "readout", "protocol", "setting", "seed", "train_size",
              "metric", "value"]


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _summary_cell(s: stats.Summary | None) -> str:
    if s is None:
        return "—"
    spread = f" ± {_fmt(s.sd)}" if s.n_draws > 1 else ""
    return f"{_fmt(s.mean)}{spread} [{_fmt(s.lo)}, {_fmt(s.hi)}]"


def _verdict_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "—"
    note = " †" if c.get("note") else ""
    return f"{c['verdict']} ({c['diff']:+.3f}, p={c['p']:.3g}){note}"


def _comparison(results: Results, task: str, setting: str, row: str, kind: str) -> dict[str, Any] | None:
    for c in results.comparisons:
        if c["task"] == task and c["setting"] == setting and c["row"] == row and c["kind"] == kind:
            return c
    return None


def markdown(results: Results, options: Options, provenance: dict[str, Any]) -> str:
    """The report as Markdown: provenance, the verdict rule, suite-level verdicts, one table
    per protocol setting (task x backbone), tasks and notes."""
    metric = options.metric
    lines = [f"# midol eval: {provenance['suite']}", ""]
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    for key in ("date", "command", "commit", "midol", "device", "suite_file", "cache_dir"):
        lines.append(f"| {key} | `{provenance.get(key, '')}` |")
    lines += ["", "| backbone | spec | source | read-outs | input px | sha256 |", "|---|---|---|---|---|---|"]
    for b in provenance["backbones"]:
        digests = "<br>".join(f"{Path(f).name}: `{d[:16]}…`" for f, d in b["sha256"].items()) or "— (random init)"
        lines.append(f"| {b['label']} | `{b['spec']}` | {b['source']} | {', '.join(b['readouts'])} | "
                     f"{b['image_size']} | {digests} |")
    lines += ["", "## How to read this report (fixed before any number was computed)", "",
              f"* Primary metric: **{metric}** (comparisons and figures); every metric of every run "
              "is in `runs.csv` and `report.json`.",
              "* A cell is `mean ± sd [95 % CI]`: the mean over the seeded draws on the full test "
              "split, the sd across draws, and the percentile CI of "
              f"{options.bootstrap} stratified bootstrap resamples of the test samples (the "
              "draw-mean recomputed on each)."
              + (" A row of several pre-training seeds (`NAME@SEED`) averages its seeds; its sd "
                 "is across seeds and its CI and comparisons resample the seeds (paired by "
                 "seed) together with the test samples." if options.pretrain_groups else ""),
              f"* {stats.VERDICT_RULE}",
              "* Each backbone is compared with the random init of its own architecture (same "
              "seed for every run) and with the baseline, on the same test samples, draws and "
              "resamples (paired). `(suite)` pools the tasks: the mean over tasks of the paired "
              "differences, tasks resampled independently.",
              "* † marks a comparison of two read-outs that differ (e.g. a ViT class token vs a "
              "Swin pooled stage).", ""]
    pooled = [c for c in results.comparisons if c["task"] == "(suite)"]
    if pooled:
        lines += [f"## Suite-level verdicts ({metric}, pooled over tasks)", "",
                  "| setting | backbone | against | tasks | seeds paired | difference [95 % CI] | p | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in pooled:
            note = " †" if c.get("note") else ""
            lines.append(f"| {c['setting']} | {c['row']} | {c['against']} ({c['kind']}){note} | "
                         f"{c['n_tasks']} | {c.get('seeds', 1)} | {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
                         f"{c['p']:.3g} | **{c['verdict']}** |")
        lines.append("")
    settings: list[Setting] = []
    for task_settings in results.settings.values():
        for s in task_settings:
            if s not in settings:
                settings.append(s)
    for setting in settings:
        lines += [f"## {setting.protocol}: {setting.name} ({metric})", ""]
        header = "| task | backbone | " + metric + " | vs random init |"
        sep = "|---|---|---|---|"
        if options.baseline:
            header += f" vs {options.baseline} |"
            sep += "---|"
        lines += [header, sep]
        for task, task_settings in results.settings.items():
            if setting not in task_settings:
                lines.append(f"| {task} | (skipped: see notes) | | |" + (" |" if options.baseline else ""))
                continue
            for row in results.rows:
                summary = results.summaries.get((task, setting.key, row.key), {}).get(metric)
                cells = [task, row.key, _summary_cell(summary),
                         "(reference)" if row.reference else
                         _verdict_cell(_comparison(results, task, setting.key, row.key, "random init"))]
                if options.baseline:
                    cells.append("(baseline)" if row.label == options.baseline else
                                 _verdict_cell(_comparison(results, task, setting.key, row.key, "baseline")))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Tasks", "", "| task | modality | type | train / val / test | patients | split rule |",
              "|---|---|---|---|---|---|"]
    for task, info in results.tasks.items():
        group = info.get("label_level") == "group"
        images = info.get("images", {})
        # a group task is scored per group: its sizes are groups, with their images beside them
        sizes = " / ".join(
            (f"{info['sizes'][k]} ({images.get(k, '?')} img)" if group else str(info["sizes"][k]))
            if k in info["sizes"] else "—" for k in ("train", "val", "test"))
        patients = ", ".join(f"{k} {v}" for k, v in info["patients"].items()) or "—"
        kind = f"{info['type']}, one label per group" if group else info["type"]
        lines.append(f"| {task} | {info['modality']} | {kind} | {sizes} | {patients} | "
                     f"{info['split_rule']} |")
    if results.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in results.notes]
    figures = provenance.get("figures") or []
    if figures:
        lines += ["", "## Label efficiency", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def as_json(results: Results, options: Options, provenance: dict[str, Any]) -> dict[str, Any]:
    summaries = [{"task": t, "setting": s, "row": r, "metric": m, "mean": v.mean, "sd": v.sd,
                  "lo": v.lo, "hi": v.hi, "n_draws": v.n_draws, "per_draw": v.per_draw}
                 for (t, s, r), by_metric in results.summaries.items() for m, v in by_metric.items()]
    return {"provenance": provenance, "options": options.__dict__, "verdict_rule": stats.VERDICT_RULE,
            "rows": [row.__dict__ | {"key": row.key} for row in results.rows],
            "tasks": results.tasks, "summaries": summaries, "comparisons": results.comparisons,
            "notes": results.notes}


def runs_csv(results: Results) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results.runs)
    return buffer.getvalue()


def label_efficiency_figures(results: Results, options: Options, folder: Path) -> list[str]:
    """Metric vs shots and vs label fraction, one panel per task, one line per row with its
    95 % CI band; the full-data linear probe as a dashed level. Returns the PNG/first names."""
    written = []
    for kind, prefix, xlabel in (("shots", "shots=", "labelled examples per class (log)"),
                                 ("fractions", "fraction=", "label fraction (log)")):
        tasks = [t for t, ss in results.settings.items() if any(s.name.startswith(prefix) for s in ss)]
        if not tasks:
            continue
        cols = min(3, len(tasks))
        nrows = math.ceil(len(tasks) / cols)
        fig = new_figure(4.2 * cols, 3.2 * nrows)
        axes = fig.subplots(nrows, cols, squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            settings = [s for s in results.settings[task] if s.name.startswith(prefix)]
            for i, row in enumerate(results.rows):
                pts = [(s.x, results.summaries[(task, s.key, row.key)][options.metric]) for s in settings]
                xs = np.array([p[0] for p in pts], dtype=float)
                mean = np.array([p[1].mean for p in pts])
                lo = np.array([p[1].lo for p in pts])
                hi = np.array([p[1].hi for p in pts])
                color = f"C{i % 10}"
                style = "--" if row.reference else "-"
                ax.plot(xs, mean, style, marker="o", ms=3, color=color, label=row.key)
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
                full = results.summaries.get((task, "linear full", row.key), {}).get(options.metric)
                if full is not None:
                    ax.axhline(full.mean, color=color, linestyle=":", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_title(task)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(options.metric)
        for ax in list(axes.flat)[len(tasks):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"label efficiency ({options.metric}, mean and 95 % CI; dotted: full-data linear probe)",
                     fontsize=9)
        path = save_figure(fig, folder / f"label_efficiency_{kind}.png")
        written.append(path.name)
    return written


def write(out: str | os.PathLike[str], results: Results, options: Options,
          provenance: dict[str, Any]) -> Path:
    """Write every file into a staging folder beside ``out``, then move them in (files of an
    earlier report with the same names are replaced; others are left alone)."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        provenance = dict(provenance)
        provenance["figures"] = label_efficiency_figures(results, options, staging)
        (staging / "runs.csv").write_text(runs_csv(results), encoding="utf-8")
        (staging / "report.json").write_text(
            json.dumps(as_json(results, options, provenance), indent=1, default=_jsonable) + "\n",
            encoding="utf-8")
        (staging / "report.md").write_text(markdown(results, options, provenance), encoding="utf-8")
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.iterdir()):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "report.md"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return value.__dict__
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def row_keys(rows: list[Row]) -> list[str]:
    return [r.key for r in rows]
