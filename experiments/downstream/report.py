"""New runs use these tables for fine-tuning tasks only; frozen-probe tasks score with midol eval (run.py).

Mean ± std over seeds and two-sided t-tests between the best two backbones (paper Table 3 style).

Pure functions over per-run results ``{backbone: {seed: {metric: value}}}``; used by ``run.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class MetricSummary:
    """One metric of one backbone over its seeds (sample std, ddof=1)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")


@dataclass
class Comparison:
    """The two backbones with the highest mean of a metric and the p-value of a two-sided
    two-sample t-test (Student's, equal variances) between their per-seed values."""

    best: str
    second: str
    p_value: float


def summarize(results: Mapping[str, Mapping[int, Mapping[str, float]]], metric: str) -> dict[str, MetricSummary]:
    """Per backbone, the metric's values over the seeds that report it (seed order)."""
    out: dict[str, MetricSummary] = {}
    for backbone, runs in results.items():
        values = [float(runs[s][metric]) for s in sorted(runs) if metric in runs[s]]
        if values:
            out[backbone] = MetricSummary(values)
    return out


def t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Student's two-sample t-test; NaN when undefined (n < 2 or both
    samples constant)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if np.var(a) == 0 and np.var(b) == 0:
        return float("nan") if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=True).pvalue)


def compare_top_two(summaries: Mapping[str, MetricSummary]) -> Comparison | None:
    """Best two backbones by mean (higher is better) and their t-test p-value."""
    ranked = sorted(summaries, key=lambda k: summaries[k].mean, reverse=True)
    if len(ranked) < 2:
        return None
    best, second = ranked[0], ranked[1]
    return Comparison(best, second, t_test(summaries[best].values, summaries[second].values))


def fmt_pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.2f}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def markdown_table(
    results: Mapping[str, Mapping[int, Mapping[str, float]]],
    metrics: Sequence[str],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Rows: backbones; columns: metrics as mean ± std in %; the best mean in bold; a last row
    with the p-value between the best two per metric; skipped backbones listed with reasons."""
    summaries = {m: summarize(results, m) for m in metrics}
    names = [m.split("/", 1)[-1].upper() for m in metrics]
    lines = ["| Backbone | " + " | ".join(f"{n} (%)" for n in names) + " |",
             "|---|" + "---|" * len(metrics)]
    comparisons = {m: compare_top_two(summaries[m]) for m in metrics}
    for backbone in results:
        cells = []
        for m in metrics:
            s = summaries[m].get(backbone)
            if s is None:
                cells.append("n/a")
                continue
            cell = f"{fmt_pct(s.mean)} ± {fmt_pct(s.std)}"
            c = comparisons[m]
            cells.append(f"**{cell}**" if c is not None and c.best == backbone else cell)
        lines.append(f"| {backbone} | " + " | ".join(cells) + " |")
    for backbone in skipped or {}:
        lines.append(f"| {backbone} | " + " | ".join("skipped" for _ in metrics) + " |")
    p_cells = []
    for m in metrics:
        c = comparisons[m]
        p_cells.append("n/a" if c is None else f"p = {fmt_p(c.p_value)} ({c.best} vs {c.second})")
    lines.append("| best vs second, two-sided t-test | " + " | ".join(p_cells) + " |")
    text = "\n".join(lines) + "\n"
    if skipped:
        text += "\n" + "\n".join(f"* {b}: skipped, {reason}" for b, reason in skipped.items()) + "\n"
    return text


def per_seed_table(
    results: Mapping[str, Mapping[int, Mapping[str, float]]],
    metrics: Sequence[str],
    runs_info: Mapping[str, Mapping[int, Mapping[str, object]]] | None = None,
) -> str:
    """Every run's value (%), for auditing the summary; with ``runs_info`` also each run's
    finishing time, wall time and the load average before it."""
    extra = ["finished", "wall (s)", "load before (1/5/15 min)"] if runs_info else []
    head = [*metrics, *extra]
    lines = ["| Backbone | Seed | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for backbone, runs in results.items():
        for seed in sorted(runs):
            cells = [fmt_pct(runs[seed].get(m, float("nan"))) for m in metrics]
            if runs_info:
                info = runs_info[backbone][seed]
                cells += [str(info.get("finished", "")), str(info.get("wall_s", "")), str(info.get("load_before", ""))]
            lines.append(f"| {backbone} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
