"""Combine the per-seed JSON files of run_dex_study.py into one markdown table.

    python experiments/dex/report.py experiments/results/dex_<date>_seed0.json ... --out experiments/results/dex_<date>.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def cell(values: list[float | None], digits: int = 3) -> str:
    shown = [f"{v:.{digits}f}" if v is not None else "n/a" for v in values]
    return " / ".join(shown)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    ns = p.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in ns.files]
    meta = runs[0]["meta"]
    rows = [("random init ViT (no pre-training)", "random_init", "dense"),
            ("plain MAE (same ViT, dense MLPs)", "mae", "dense"),
            ("DEX, director mode (dense export)", "dex", "director"),
            ("DEX, routed-experts mode", "dex", "experts")]
    heldout = list(runs[0]["rows"]["random_init"]["eval"]["dense"]["heldout"])
    lines = [
        "# DEX vs plain MAE at small scale (tiny ViT, five-modality corpus)",
        "",
        f"- Date: {meta['date']}; device: {meta['device']}; commit {meta['commit']}.",
        "- Commands: " + "; ".join(f"`{r['meta']['command']}`" for r in runs)
        + f"; then `python experiments/dex/report.py {' '.join(ns.files)} --out {ns.out}`.",
        f"- Setting: experiments/dex/base.yaml (ViT patch 8, dim 64, depth 6, 64 px, one view per "
        f"image, mask 0.75; DEX: 8 experts top-2 in every block, L_co CE 0.01, L_bal 0.01 constant), "
        f"sources of experiments/ablations/shared_data.yaml, batch 32, {meta['steps']} steps; "
        "rows differ only by use_dex. Settings fixed before any probe ran.",
        "- Probes: logistic regression on frozen pooled (class-token) features; held-out = MedMNIST "
        "test splits not in the corpus (macro AUC, 5-fold out-of-fold); corpus = labelled sets that "
        "are also in the unlabelled corpus (accuracy). Values: seed 0 / seed 1.",
        "- Routing: each block's per-image top-1 expert (experts mode, no noise) over up to 200 "
        "corpus images per modality; NMI / purity vs modality, mean (min-max) over the 6 blocks. "
        "'random routers' = an untrained DEX.",
        "",
        "| row | held-out AUC mean | " + " | ".join(heldout) + " | corpus probe acc | block NMI mean (min-max) | block purity mean | experts used (mean of blocks) | min |",
        "|" + "---|" * (6 + len(heldout)),
    ]

    def blocks_summary(ev: dict) -> tuple[str, str, str]:
        parts = []
        for r in runs_eval(ev):
            if r is None:
                parts.append(None)
                continue
            nmi = [b["nmi"] for b in r.values()]
            parts.append((np.mean(nmi), min(nmi), max(nmi), np.mean([b["purity"] for b in r.values()]),
                          np.mean([b["experts_used"] for b in r.values()])))
        nmi = " / ".join(f"{x[0]:.3f} ({x[1]:.2f}-{x[2]:.2f})" for x in parts if x)
        pur = " / ".join(f"{x[3]:.3f}" for x in parts if x)
        used = " / ".join(f"{x[4]:.1f}" for x in parts if x)
        return nmi, pur, used

    def runs_eval(key: str):
        return [r["rows"].get(key, {}).get("eval", {}).get("blocks") for r in runs]

    for label, key, mode in rows:
        evs = [r["rows"].get(key, {}).get("eval", {}).get(mode) for r in runs]
        if any(e is None for e in evs):
            continue
        mins = [r["rows"][key].get("minutes") for r in runs]
        nmi, pur, used = blocks_summary(key) if mode == "experts" else ("", "", "")
        lines.append(
            f"| {label} | {cell([e['heldout_mean_auc'] for e in evs])} | "
            + " | ".join(cell([e["heldout"][h] for e in evs]) for h in heldout)
            + f" | {cell([e['probe_mean_acc'] for e in evs])} | {nmi} | {pur} | {used} | "
            + (cell(mins, 1) if all(m is not None for m in mins) else "") + " |")
    rnd = [r["rows"].get("random_init_dex", {}).get("eval", {}).get("blocks") for r in runs]
    if all(rnd):
        vals = [np.mean([b["nmi"] for b in x.values()]) for x in rnd]
        lines.append(f"| random routers (untrained DEX) | | {' | '.join('' for _ in heldout)} | | "
                     f"{' / '.join(f'{v:.3f}' for v in vals)} | | | |")
    lines += ["", "Per block (seed 0 / seed 1), DEX experts mode: NMI, purity, experts used, max load:", ""]
    for name in runs[0]["rows"]["dex"]["eval"]["blocks"]:
        cells = []
        for r in runs:
            b = r["rows"]["dex"]["eval"]["blocks"][name]
            cells.append(f"{b['nmi']:.3f}, {b['purity']:.3f}, {b['experts_used']}, {b['max_load']:.2f}")
        lines.append(f"- {name}: " + " / ".join(cells))
    Path(ns.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
