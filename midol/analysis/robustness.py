"""How a fusion model holds up when inputs go missing: MedMIX's protocols, one report.

The protocols are the paper's (MedMIX, arXiv 2605.16639, figures: a test-time drop-rate sweep,
one-modality drop) plus a not-at-random pattern a referee asked for; their exact form is
midol's design (:mod:`midol.data.missingness`). Every model is scored on the same patients with
the same masks (fixed seeds). Metric: macro AUC over labels (classes for multi-class) from
torchmetrics, undefined labels left out.

Anything with ``predict_rows(rows, present) -> probabilities`` and a patient ``table`` can be
evaluated (a set-up :class:`~midol.fusion.module.MedMIX`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midol.analysis.plotting import new_figure, save_figure
from midol.data.missingness import (
    DEFAULT_SWEEP_RATES,
    drop_input,
    not_at_random_drop,
    positive_patients,
    sweep_masks,
)
from midol.fusion.patient_features import PatientFeatures
from midol.io.atomic import atomic_write_text
from midol.tasks.task_metrics import OneVsRestAUROC, PerLabelAUROC, macro


@dataclass
class Protocols:
    """Which evaluations to run.

    Attributes:
        rates: test-time drop rates of the sweep (each present input dropped with that
            probability, at least one kept).
        seeds: mask seeds of the sweep and of the not-at-random draws (mean and std reported).
        drop_each_input: also score with each input removed for every patient that has another.
        not_at_random: for each image input, drop it with ``nar_p_pos`` for positive patients
            and ``nar_p_neg`` for the others.
        negative_labels: multi-label: labels that do not make a patient "positive" (ODIR: N,
            normal); multi-class: the negative classes.
        natural_subset: also score the patients who naturally lack some input.
        bootstrap: patient resamples of the not-at-random check's confidence interval.
    """

    rates: Sequence[float] = DEFAULT_SWEEP_RATES
    seeds: Sequence[int] = (0, 1, 2)
    drop_each_input: bool = True
    not_at_random: bool = True
    nar_p_pos: float = 0.6
    nar_p_neg: float = 0.1
    negative_labels: Sequence[str] = ("N",)
    natural_subset: bool = True
    bootstrap: int = 200


@dataclass
class Score:
    model: str
    protocol: str  # sweep, drop_input, not_at_random, natural_incomplete, complete
    setting: str  # e.g. "0.3", "left_fundus", "all"
    macro_auc: float
    std: float = 0.0
    patients: int = 0
    per_label: dict[str, float] = field(default_factory=dict)
    # not_at_random only: macro AUC minus that of the natural masks on the same patients, its
    # 95% bootstrap CI, and whether the CI lies above 0 (the model gains from missingness)
    gain: float | None = None
    gain_ci: tuple[float, float] | None = None
    reads_missingness: bool = False


def auc_gain(base: torch.Tensor, dropped: Sequence[torch.Tensor], targets: torch.Tensor,
             label_names: Sequence[str], resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over mask seeds of macro AUC(dropped) - macro AUC(base) on the same patients, and
    its 95% percentile CI over ``resamples`` patient resamples (paired: one resample scores both).

    A clinical model must not improve when an input goes missing mostly for sick patients: a
    CI above 0 means it reads the label from the absence itself (issue 26)."""

    def gain(idx: torch.Tensor | slice) -> float:
        ref = macro_auc(base[idx], targets[idx], label_names)[0]
        return float(np.mean([macro_auc(d[idx], targets[idx], label_names)[0] - ref for d in dropped]))

    point = gain(slice(None))
    rng = np.random.default_rng(seed)
    n = len(targets)
    draws = [gain(torch.as_tensor(rng.integers(0, n, n))) for _ in range(resamples)]
    finite = [d for d in draws if math.isfinite(d)]
    if not finite:
        return point, math.nan, math.nan
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return point, float(lo), float(hi)


def macro_auc(probs: torch.Tensor, targets: torch.Tensor, label_names: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Macro AUC (undefined labels left out) and the per-label AUCs."""
    n = len(label_names)
    if targets.ndim == 2:
        metric: Any = PerLabelAUROC(n)
        metric.update(probs.float(), targets.long())
    else:
        metric = OneVsRestAUROC(n)
        metric.update(probs.float(), targets.long())
    values = metric.compute()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean = float(macro(values))
    return mean, {k: float(v) for k, v in zip(label_names, values.tolist(), strict=True) if math.isfinite(v)}


def _is_image(table: Any, name: str) -> bool:
    return any(spec.name == name and spec.kind == "image" for spec in table.inputs)


def evaluate(model: Any, name: str, rows: np.ndarray, protocols: Protocols | None = None) -> list[Score]:
    """Every protocol on ``rows`` of ``model.table`` (the test split, usually)."""
    p = protocols or Protocols()
    table = model.table
    rows = np.asarray(rows, dtype=np.int64)
    natural = torch.as_tensor(table.present[rows], dtype=torch.bool)
    features = getattr(model, "features", None)
    available = features.available if isinstance(features, PatientFeatures) else None
    if available is not None:  # unreadable images count as absent
        natural &= available[torch.as_tensor(rows)].cpu()
    empty = ~natural.any(dim=1)
    if bool(empty.any()):  # e.g. a corrupt JPEG that was a patient's only input
        lost = rows[empty.numpy()]
        files = [f for name in getattr(table, "input_names", []) if _is_image(table, name)
                 for f in (table.image_files(name)[r] for r in lost[:5]) if f]
        warnings.warn(f"{name}: {len(lost)} patient(s) have no readable input and are left out of "
                      f"the robustness scores: {', '.join(str(table.patient_ids[r]) for r in lost[:5])}"
                      + (f" (their files: {', '.join(map(str, files[:5]))})" if files else ""),
                      UserWarning, stacklevel=2)
        rows, natural = rows[~empty.numpy()], natural[~empty]
    targets = torch.as_tensor(table.targets[rows])
    labels = list(table.label_names)
    scores: list[Score] = []

    def score(protocol: str, setting: str, masks: list[torch.Tensor], subset: np.ndarray | None = None) -> None:
        values: list[float] = []
        per_label: dict[str, float] = {}
        sel = slice(None) if subset is None else torch.as_tensor(subset)
        for mask in masks:
            probs = model.predict_rows(rows[sel], mask[sel])
            auc, per_label = macro_auc(probs, targets[sel], labels)
            values.append(auc)
        count = len(rows) if subset is None else int(np.asarray(subset).sum())
        scores.append(Score(name, protocol, setting, float(np.mean(values)),
                            float(np.std(values)) if len(values) > 1 else 0.0, count,
                            per_label if len(masks) == 1 else {}))

    seeds = list(p.seeds)
    per_seed = [sweep_masks(natural, p.rates, s) for s in seeds]
    for i, q in enumerate(p.rates):
        score("sweep", f"{q:g}", [masks[i] for masks in per_seed])
    if p.drop_each_input:
        for m, input_name in enumerate(table.input_names):
            others = natural.clone()
            others[:, m] = False
            subset = others.any(dim=1).numpy()
            if subset.sum() == 0:
                continue
            mask = natural.clone()
            mask[torch.as_tensor(subset)] = drop_input(natural[torch.as_tensor(subset)], m)
            score("drop_input", input_name, [mask], subset)
    if p.not_at_random:
        positive = torch.as_tensor(positive_patients(table.targets[rows], labels, p.negative_labels))
        base = model.predict_rows(rows, natural)
        for m, spec in enumerate(table.inputs):
            if spec.kind != "image":
                continue
            masks = [not_at_random_drop(natural, positive, p.nar_p_pos, p.nar_p_neg,
                                        torch.Generator().manual_seed(s), m) for s in seeds]
            score("not_at_random", spec.name, masks)
            if p.bootstrap > 0:
                dropped = [model.predict_rows(rows, mask) for mask in masks]
                point, lo, hi = auc_gain(base, dropped, targets, labels, p.bootstrap)
                last = scores[-1]
                last.gain, last.gain_ci, last.reads_missingness = point, (lo, hi), bool(lo > 0)
    if p.natural_subset:
        incomplete = (~natural).any(dim=1).numpy()
        if incomplete.sum() > 0:
            score("natural_incomplete", "some input missing", [natural], incomplete)
            score("complete", "all inputs present", [natural], ~incomplete)
    return scores


def write_report(scores: list[Score], out_dir: str | Path, title: str = "Robustness to missing inputs",
                 header: str = "") -> dict[str, Path]:
    """``robustness.json`` (every score), ``robustness.csv``, ``robustness.md`` (one column per
    model) and ``robustness.png`` (macro AUC vs test-time drop rate, one line per model)."""
    out = Path(out_dir)
    models = list(dict.fromkeys(s.model for s in scores))
    settings = list(dict.fromkeys((s.protocol, s.setting) for s in scores))
    lookup = {(s.model, s.protocol, s.setting): s for s in scores}
    paths = {"json": out / "robustness.json", "csv": out / "robustness.csv",
             "md": out / "robustness.md", "png": out / "robustness.png"}
    atomic_write_text(paths["json"], json.dumps([asdict(s) for s in scores], indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "protocol", "setting", "macro_auc", "std", "patients"])
    for s in scores:
        writer.writerow([s.model, s.protocol, s.setting, f"{s.macro_auc:.4f}", f"{s.std:.4f}", s.patients])
    atomic_write_text(paths["csv"], buf.getvalue())
    lines = [f"# {title}", ""] + ([header, ""] if header else [])
    lines += ["Macro AUC (mean ± std over mask seeds where the protocol draws masks).", "",
              "| protocol | setting | patients | " + " | ".join(models) + " |",
              "|---|---|---:|" + "---:|" * len(models)]
    for protocol, setting in settings:
        cells = []
        # models with other inputs score other patients: one count per model where they differ
        counts = [lookup[(m, protocol, setting)].patients for m in models if (m, protocol, setting) in lookup]
        count = str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))
        best = max((lookup[(m, protocol, setting)].macro_auc for m in models
                    if (m, protocol, setting) in lookup), default=float("nan"))
        for m in models:
            found = lookup.get((m, protocol, setting))
            if found is None:
                cells.append("")
                continue
            text = f"{found.macro_auc:.3f}" + (f" ± {found.std:.3f}" if found.std else "")
            cells.append(f"**{text}**" if found.macro_auc == best and len(models) > 1 else text)
        label = "drop rate " + setting if protocol == "sweep" else setting
        lines.append(f"| {protocol} | {label} | {count} | " + " | ".join(cells) + " |")
    lines += missingness_section(scores, models)
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    plot_sweep(scores, paths["png"])
    return paths


def missingness_section(scores: list[Score], models: list[str]) -> list[str]:
    """The not-at-random check: per model and input, the AUC gain over the natural masks with
    its CI, and a flag where the CI lies above 0."""
    checked = [s for s in scores if s.protocol == "not_at_random" and s.gain_ci is not None]
    if not checked:
        return []
    lines = ["", "## Does the model read the label from what is missing?", "",
             "Each image input is dropped mostly for positive patients (not at random). A model "
             "whose AUC *rises* then has learned that absence predicts the label (e.g. sicker "
             "patients have fewer images in training): in the clinic its output would move with "
             "what was not acquired, not with what was seen. Gain = macro AUC under that drop "
             "minus macro AUC with the natural inputs, same patients (95% CI over patient "
             "resamples); **flagged** when the whole CI lies above 0.", "",
             "| model | input dropped | AUC gain | 95% CI | verdict |", "|---|---|---:|---|---|"]
    for s in checked:
        assert s.gain is not None and s.gain_ci is not None
        verdict = ("**flagged: AUC rises when this input goes missing for positive patients**"
                   if s.reads_missingness else "no gain (within noise or a loss)")
        lines.append(f"| {s.model} | {s.setting} | {s.gain:+.4f} | [{s.gain_ci[0]:+.4f}, "
                     f"{s.gain_ci[1]:+.4f}] | {verdict} |")
    return lines


def plot_sweep(scores: list[Score], path: str | Path) -> Path:
    """Macro AUC vs test-time drop rate, one line per model (bands: std over mask seeds)."""
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for model in dict.fromkeys(s.model for s in scores):
        sweep = [s for s in scores if s.model == model and s.protocol == "sweep"]
        if not sweep:
            continue
        x = np.array([float(s.setting) for s in sweep])
        y = np.array([s.macro_auc for s in sweep])
        e = np.array([s.std for s in sweep])
        (line,) = ax.plot(x, y, marker="o", label=model)
        ax.fill_between(x, y - e, y + e, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("test-time drop rate per input")
    ax.set_ylabel("macro AUC")
    ax.set_title("Robustness to missing inputs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
