"""Writes experiments/results/eval_study_2026-12-07.md from the study's runs (run.json per run)
and the `midol eval` reports copied under experiments/results/eval_study_2026-12-07/. Every
number is read from those files; nothing is chosen here (the tables and the headline setting
are the ones rows.yaml fixed before any result)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

OUT = Path("outputs/eval_study")
HEADLINE = "linear full"
SETTING_ORDER = ["knn k=10", "knn k=20", "linear full", "fewshot shots=1", "fewshot shots=5",
                 "fewshot shots=10", "fewshot shots=25", "fewshot fraction=0.01",
                 "fewshot fraction=0.1"]
STRICT_TASK = "retinamnist"  # the only task sharing no image with the corpus (rows.yaml caveat)


def _f(x: Any, d: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{d}f}"


def _load(results_dir: Path, name: str) -> dict[str, Any] | None:
    path = results_dir / name / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _runs(study: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for row in study["rows"]:
        for s in study["seeds"]:
            f = OUT / row["name"] / f"seed{s}" / "run.json"
            if f.is_file():
                out[(row["name"], s)] = json.loads(f.read_text())
    return out


def _settings(rep: dict[str, Any]) -> list[str]:
    present = {c["setting"] for c in rep["comparisons"]}
    return [s for s in SETTING_ORDER if s in present] + sorted(present - set(SETTING_ORDER))


def _cmp(rep: dict[str, Any], task: str, setting: str, row: str, kind: str) -> dict[str, Any] | None:
    for c in rep["comparisons"]:
        if c["task"] == task and c["setting"] == setting and c["row"] == row and c["kind"] == kind:
            return c
    return None


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "—"
    v = c["verdict"]
    v = {"better": "**better**", "worse": "**WORSE**"}.get(v, "n.d.")
    return f"{v} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def _seeds_of(rep: dict[str, Any], row_key: str) -> str:
    for r in rep["rows"]:
        if r["key"] == row_key:
            return ",".join(s for s in r.get("seeds", ()) if s != "") or "?"
    return "?"


def _rows(rep: dict[str, Any], references: bool = False) -> list[str]:
    return [r["key"] for r in rep["rows"] if bool(r["reference"]) == references]


def verdict_table(rep: dict[str, Any], task: str, kinds: list[str], rows: list[str] | None = None,
                  settings: list[str] | None = None) -> list[str]:
    """One line per (row, setting): the verdict against each kind (random init, baseline)."""
    rows = rows or _rows(rep)
    settings = settings or _settings(rep)
    base = rep["options"].get("baseline")
    heads = [f"vs {'random init' if k == 'random init' else base}" for k in kinds]
    lines = ["| row (seeds) | setting | " + " | ".join(heads) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for row in rows:
        for s in settings:
            cells = [_cell(_cmp(rep, task, s, row, k)) for k in kinds]
            if all(c == "—" for c in cells):
                continue
            lines.append(f"| {row} ({_seeds_of(rep, row)}) | {s} | " + " | ".join(cells) + " |")
    return lines


def count_line(rep: dict[str, Any], task: str, row: str, kind: str) -> str:
    """better / n.d. / worse counts over the settings of each protocol."""
    parts = []
    for proto in ("knn", "linear", "fewshot"):
        cs = [_cmp(rep, task, s, row, kind) for s in _settings(rep) if s.startswith(proto)]
        cs = [c for c in cs if c]
        if not cs:
            continue
        b = sum(c["verdict"] == "better" for c in cs)
        w = sum(c["verdict"] == "worse" for c in cs)
        parts.append(f"{proto}: {b} better / {len(cs) - b - w} n.d. / {w} worse")
    return "; ".join(parts)


def score_table(rep: dict[str, Any], setting: str) -> list[str]:
    tasks = list(rep["tasks"])
    lines = ["| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    metric = rep["options"]["metric"]
    for r in rep["rows"]:
        cells = []
        for t in tasks:
            s = next((x for x in rep["summaries"] if x["task"] == t and x["setting"] == setting
                      and x["row"] == r["key"] and x["metric"] == metric), None)
            cells.append("—" if s is None else f"{_f(s['mean'])} ± {_f(s['sd'])} [{_f(s['lo'])}, {_f(s['hi'])}]")
        lines.append(f"| {r['key']} | " + " | ".join(cells) + " |")
    return lines


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def headline_statements(rep: dict[str, Any], task: str, kinds: list[str], what: str) -> list[str]:
    """Sentences for the headline setting, one per (row, kind), written from the verdicts."""
    base = rep["options"].get("baseline")
    out = []
    for row in _rows(rep):
        for k in kinds:
            c = _cmp(rep, task, HEADLINE, row, k)
            if c is None:
                continue
            other = "random init" if k == "random init" else base
            v = c["verdict"]
            word = {"better": "is BETTER than", "worse": "is WORSE than"}.get(v, "is NOT DISTINGUISHABLE from")
            out.append(f"- {what}: **{row}** {word} {other}: {c['diff']:+.3f} AUC "
                       f"[{c['lo']:+.3f}, {c['hi']:+.3f}], p = {c['p']:.3g}"
                       + (f", {c.get('seeds')} seeds" if c.get("seeds") else "") + ".")
    return out


def write(study: dict[str, Any], evals: list[dict[str, Any]], md_path: Path, results_dir: Path) -> None:
    runs = _runs(study)
    order = study["order"]
    seeds = study["seeds"]
    L: list[str] = []
    complete = all((n, s) in runs and runs[(n, s)]["status"] == "done" for n in order for s in seeds)
    L += [f"# Eval study: M-IDoL vs random init and its DINO baseline, the ladder, DEX vs MAE"
          f"{'' if complete else ' — PARTIAL (runs still training)'}", ""]
    L += [f"- Written: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; repository commit "
          f"before this file: {_commit()}.",
          f"- Device: CPU ({platform.machine()}), {os.cpu_count()} cores shared with two other "
          "engineers' jobs; every run and eval with OMP_NUM_THREADS=1, 1 torch thread "
          "(`--threads 1`), 1 data worker, one process at a time. Wall times depend on that load.",
          "- Protocol: experiments/eval_study/rows.yaml, fixed 2026-12-07 before any result "
          "(rows, seeds, budgets, suites, probes, baselines, ladder comparisons, headline "
          f"setting `{HEADLINE}` pooled over the primary suite). Driver: "
          "`OMP_NUM_THREADS=1 .venv/bin/python experiments/eval_study/run_study.py` (each run's "
          "exact `midol fit` command is in outputs/eval_study/<row>/seed<S>/run.json and below; "
          "each eval's command is below and in its report.json).",
          "- Pre-training (M-IDoL ladder): configs/ablations/base.yaml + "
          "experiments/ablations/shared_data.yaml, tiny Swin (embed 32, depths 2-2-2-2), 2 global "
          "64 px + 6 local 32 px views, batch 32, 640 draws/epoch, 25 epochs = 500 optimiser steps "
          "(midol_batch128: batch 128, 125 steps, the same 16,000 images); DEX/MAE: "
          "experiments/dex/base.yaml + the same corpus, tiny ViT 64 px, batch 32, 25 epochs = 500 "
          "steps. Seeds 0-4 (`--seed_everything S`).",
          "- Evaluation: `midol eval` (kNN k = 10, 20; linear probe on the full training split; "
          "few-shot linear probes with 1/5/10/25 shots and 1 %/10 % label fractions, 5 draws each), "
          "primary metric AUC, `--pretrain_groups true`: a row's value is the mean over its "
          "pre-training seeds, comparisons are paired by seed against the baseline and against "
          "random init at the same seeds, 95 % intervals from a two-level bootstrap over seeds and "
          "test samples (1000 resamples). Verdict rule (midol eval's, fixed before any number): "
          "better / worse when the 95 % interval of the difference excludes 0, else not "
          "distinguishable (n.d.); no multiplicity correction.",
          "- Primary suite configs/eval/heldout_medmnist.yaml: pneumoniamnist + retinamnist, "
          "whose files are not in the corpus. **Caveat (found before any number, rows.yaml):** "
          "pneumoniamnist's official test split (624 images) is Kermany's test split, which the "
          "corpus holds at 224 px (chest_xray/kermany_pneumonia_testsplit_224), so its test images "
          "were seen unlabelled in pre-training; retinamnist alone is strictly held out and is "
          "reported on its own too. Secondary suite configs/eval/shared_data.yaml: those two plus "
          "7 tasks whose images are in the unlabelled pre-training corpus (transductive).", ""]

    # ---- runs
    L += ["## Runs done (minutes of wall time per run)", "",
          "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean min |",
          "|---|" + "---|" * (len(seeds) + 1)]
    spans = {}
    for key, r in runs.items():
        end = dt.datetime.fromisoformat(r["finished_at"]).timestamp()
        spans[key] = (end - r["wall_seconds"], end)

    def overlapped(key: tuple[str, int]) -> bool:
        a0, a1 = spans[key]
        return any(k != key and b0 < a1 and a0 < b1 for k, (b0, b1) in spans.items())

    n_over = 0
    for n in order:
        cells, mins = [], []
        for s in seeds:
            r = runs.get((n, s))
            if r is None:
                cells.append("—")
            elif r["status"] != "done":
                cells.append(f"FAILED (rc {r['returncode']}, step {r['global_step']})")
            else:
                star = "*" if overlapped((n, s)) else ""
                n_over += bool(star)
                cells.append(f"{r['minutes']:.1f}{star}")
                mins.append(r["minutes"])
        L.append(f"| {n} | " + " | ".join(cells) + f" | {(sum(mins) / len(mins)) if mins else float('nan'):.1f} |")
    if n_over:
        L += ["", f"\\* {n_over} run(s) overlapped in time with another training run of this "
              "study: a second stream (/tmp/extra_seeds.sh: dino and midol at seeds 4, 3, 2 "
              "through `run_study.py --only`, same commands and run folders) was started at "
              "19:23 beside the driver, not by the driver; those wall times are inflated by "
              "sharing the 2 cores, the runs themselves follow the protocol."]
    t0 = runs.get(("midol", 0))
    if t0:
        L += ["", f"Timing run (first of the study, alone on the driver): midol seed 0, "
              f"{t0['minutes']:.1f} min for {t0['global_step']} steps "
              f"({t0['wall_seconds'] / max(1, t0['global_step']):.2f} s/step), load average before "
              f"{t0['load_before']}, after {t0['load_after']}; finished {t0['finished_at']}. "
              f"Command: `{t0['command']}`."]
    L.append("")

    # ---- evals
    reps = {f"{e['name']}_{e['suite']}": _load(results_dir, f"{e['name']}_{e['suite']}") for e in evals}
    L += ["## Evals run for this version of the file", "",
          "| eval | suite | backbones | minutes | rc | report |", "|---|---|---|---|---|---|"]
    for e in evals:
        minutes = "reused" if e.get("minutes") is None else f"{e['minutes']:.1f}"
        backbones = "—" if e.get("n_backbones") is None else e["n_backbones"]
        L.append(f"| {e['name']} | {e['suite_file']} | {backbones} | {minutes} | "
                 f"{e['rc']} | {e.get('copied_to', '—')} |")
    L += [""] + [f"- `{e['name']}_{e['suite']}`: `{e['command']}`" for e in evals] + [""]
    for key, rep in reps.items():
        if rep:
            p = rep["provenance"]
            L.append(f"- `{key}`: date {p['date']}, commit {p['commit']}, device {p['device']}, "
                     f"{p['seconds']:.0f} s.")
    L.append("")

    swin, vit = reps.get("swin_primary"), reps.get("vit_primary")
    # ---- headline
    L += ["## Verdicts as they come out", ""]
    if swin:
        L += [f"### Primary suite, pooled over its 2 tasks, headline setting `{HEADLINE}`", ""]
        L += headline_statements(swin, "(suite)", ["random init", "baseline"], "primary, pooled")
        L += ["", f"### Strictly held-out task only ({STRICT_TASK}), `{HEADLINE}`", ""]
        L += headline_statements(swin, STRICT_TASK, ["random init", "baseline"], STRICT_TASK)
        L += ["", "### Per protocol (primary suite pooled): counts of verdicts over the settings", "",
              "| row | vs random init | vs dino |", "|---|---|---|"]
        for row in _rows(swin):
            L.append(f"| {row} | {count_line(swin, '(suite)', row, 'random init')} | "
                     f"{count_line(swin, '(suite)', row, 'baseline') or '(baseline)'} |")
        L.append("")
    ladder = [("ladder_moe_primary", "2 -> 3: + MoE (N = 5), no L_route"),
              ("ladder_route_primary", "3 -> 4: + L_route (M-IDoL)"),
              ("ladder_midol_primary", "4 -> 5/6/7: stop-grad, recommended setting, batch 128")]
    if swin or any(reps.get(k) for k, _ in ladder):
        L += ["### Where does any harm enter? The ladder, each change against the row it changes "
              f"(primary suite pooled, `{HEADLINE}`)", ""]
        if swin:
            c = _cmp(swin, "(suite)", HEADLINE, "infonce_nomoe", "baseline")
            L.append(f"- 1 -> 2 (DINO-CE -> InfoNCE, no MoE): infonce_nomoe vs dino: {_cell(c)}")
        for key, what in ladder:
            rep = reps.get(key)
            if not rep:
                continue
            for row in _rows(rep):
                if row == rep["options"]["baseline"]:
                    continue
                c = _cmp(rep, "(suite)", HEADLINE, row, "baseline")
                L.append(f"- {what}: {row} vs {rep['options']['baseline']}: {_cell(c)}")
        L.append("")
    if vit:
        L += [f"### DEX vs MAE (primary suite pooled, `{HEADLINE}`; ViT read-outs cls and avg)", ""]
        L += headline_statements(vit, "(suite)", ["random init", "baseline"], "primary, pooled")
        L += ["", f"{STRICT_TASK} only:", ""]
        L += headline_statements(vit, STRICT_TASK, ["random init", "baseline"], STRICT_TASK)
        L.append("")

    # ---- full tables
    if swin:
        L += ["## Primary suite: every setting, pooled over tasks (M-IDoL ladder)", "",
              "Cells: verdict, difference of AUC [95 % CI]. n.d. = not distinguishable.", ""]
        L += verdict_table(swin, "(suite)", ["random init", "baseline"]) + [""]
        L += [f"## Primary suite, {STRICT_TASK} alone (strictly held out)", ""]
        L += verdict_table(swin, STRICT_TASK, ["random init", "baseline"]) + [""]
        L += ["## Primary suite, pneumoniamnist alone (test images seen unlabelled in pre-training)", ""]
        L += verdict_table(swin, "pneumoniamnist", ["random init", "baseline"]) + [""]
        L += [f"### AUC per task, `{HEADLINE}` (mean ± sd across seeds [95 % CI])", ""]
        L += score_table(swin, HEADLINE) + [""]
    for key, what in ladder:
        rep = reps.get(key)
        if rep:
            L += [f"## Ladder {what}: every setting, pooled", ""]
            L += verdict_table(rep, "(suite)", ["baseline"]) + [""]
    if vit:
        L += ["## DEX vs MAE, primary suite: every setting, pooled", ""]
        L += verdict_table(vit, "(suite)", ["random init", "baseline"]) + [""]
        L += [f"### AUC per task, `{HEADLINE}`", ""] + score_table(vit, HEADLINE) + [""]
    sec_swin, sec_vit = reps.get("swin_secondary"), reps.get("vit_secondary")
    if sec_swin or sec_vit:
        L += ["## Secondary suite (shared_data: 9 tasks, 7 of them transductive), pooled", "",
              "Its tasks other than the two MedMNIST sets are images of the unlabelled "
              "pre-training corpus: pre-training has seen their test images, so these verdicts "
              "are transductive and do not answer the held-out question.", ""]
        for rep in (sec_swin, sec_vit):
            if rep:
                L += verdict_table(rep, "(suite)", ["random init", "baseline"], settings=[HEADLINE]) + [""]
                L += ["Per protocol (pooled):", "", "| row | vs random init | vs baseline |", "|---|---|---|"]
                for row in _rows(rep):
                    L.append(f"| {row} | {count_line(rep, '(suite)', row, 'random init')} | "
                             f"{count_line(rep, '(suite)', row, 'baseline') or '(baseline)'} |")
                L += ["", f"AUC per task, `{HEADLINE}`:", ""] + score_table(rep, HEADLINE) + [""]
    notes = []
    for key, rep in reps.items():
        if rep and rep.get("notes"):
            notes += [f"- {key}: {n}" for n in rep["notes"]]
    if notes:
        L += ["## Notes from midol eval", ""] + sorted(set(notes)) + [""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(L) + "\n")
