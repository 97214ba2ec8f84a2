"""New runs score with midol eval: this reads run_dex_study.py JSON files written since the port (older files: use the commit that wrote them).

Combine the per-seed JSON files of run_dex_study.py into one markdown table.

    python experiments/dex/report.py experiments/results/dex_<date>_seed0.json ... --out experiments/results/dex_<date>.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import scoring  # noqa: E402

# (table label, midol eval label of run_dex_study.py, routing blocks of this row)
ROWS = [("plain MAE (same ViT, dense MLPs)", "mae", None),
        ("DEX, director mode (dense export)", "dex director", None),
        ("DEX, routed-experts mode", "dex experts", "dex")]


def blocks_cell(blocks: list[dict[str, Any] | None]) -> tuple[str, str, str]:
    """Per seed: block NMI mean (min-max), purity mean, experts used (mean of blocks)."""
    parts = []
    for b in blocks:
        if not b:
            continue
        nmi = [x["nmi"] for x in b.values()]
        parts.append((np.mean(nmi), min(nmi), max(nmi), np.mean([x["purity"] for x in b.values()]),
                      np.mean([x["experts_used"] for x in b.values()])))
    return (" / ".join(f"{x[0]:.3f} ({x[1]:.2f}-{x[2]:.2f})" for x in parts),
            " / ".join(f"{x[3]:.3f}" for x in parts), " / ".join(f"{x[4]:.1f}" for x in parts))


def row_keys(digest: dict[str, Any], label: str) -> list[str]:
    """The report rows of a backbone label (one per read-out: ``label [cls]``, ``label [avg]``)."""
    return [k for k in digest["rows"] if k == label or k.startswith(f"{label} [")]


def markdown(runs: list[dict[str, Any]], files: list[str], out: str) -> str:
    meta = runs[0]["meta"]
    heldout = list(meta["heldout_tasks"])
    probes = [r["rows"]["probes"] for r in runs]
    first = probes[0]["heldout"]
    baseline = meta.get("baseline")
    lines = [
        "# DEX vs plain MAE at small scale (tiny ViT, five-modality corpus)",
        "",
        f"- Date: {meta['date']}; device: {meta['device']}; commit {meta['commit']}.",
        "- Commands: " + "; ".join(f"`{r['meta']['command']}`" for r in runs)
        + f"; then `python experiments/dex/report.py {' '.join(files)} --out {out}`.",
        f"- Setting: experiments/dex/base.yaml (ViT patch 8, dim 64, depth 6, 64 px, one view per "
        f"image, mask 0.75; DEX: 8 experts top-2 in every block, L_co CE 0.01, L_bal 0.01 constant), "
        f"sources of experiments/ablations/shared_data.yaml, batch 32, {meta['steps']} steps; "
        "rows differ only by use_dex. Settings fixed before any probe ran.",
        f"- Probes: {meta['probe_method']}. Read-outs: class token [cls] and mean of the patch "
        f"tokens [avg]. Held out (MedMNIST, not in the corpus): {', '.join(heldout)}; corpus "
        f"tasks (also in the unlabelled corpus): {', '.join(probes[0]['corpus']['tasks'])}. "
        "`vs random init` / `vs plain MAE`: paired differences pooled over the group's tasks, "
        "with midol eval's verdict. Values: " + " / ".join(f"seed {r['meta']['seed']}" for r in runs) + ".",
        "- Routing: each block's per-image top-1 expert (experts mode, no noise) over up to 200 "
        "corpus images per modality; NMI / purity vs modality, mean (min-max) over the 6 blocks. "
        "'random routers' = an untrained DEX.",
        "",
        "| row | held-out linear AUC (mean of tasks) | vs random init (held-out) | vs plain MAE (held-out) | "
        + " | ".join(f"{h} [95 % CI]" for h in heldout)
        + " | corpus linear AUC (mean of tasks) | vs random init (corpus) | vs plain MAE (corpus) | "
        "block NMI mean (min-max) | block purity mean | experts used (mean of blocks) | min |",
        "|" + "---|" * (11 + len(heldout)),
    ]
    table: list[tuple[str, str, str | None]] = [("random init ViT (no pre-training, the reference)" + (" [" + ref.rsplit(" [", 1)[1] if " [" in ref else ""),
              ref, None) for ref in first["references"]]
    table += [(label + key[len(name):], key, blocks)
              for label, name, blocks in ROWS for key in row_keys(first, name)]
    for label, key, blocks_row in table:
        groups = {g: [p[g] for p in probes] for g in scoring.GROUPS}
        reference = key in first["references"]

        def vs(group: str, kind: str, key: str = key, reference: bool = reference,
               groups: dict = groups) -> str:
            if kind == "vs_random" and reference:
                return "(reference)"
            if kind == "vs_baseline" and key.split(" [")[0] == baseline:
                return "(baseline)"
            return " / ".join(scoring.verdict_cell(scoring.versus(d, key, kind=kind)) for d in groups[group])

        if blocks_row:
            nmi, pur, used = blocks_cell([r["rows"].get(blocks_row, {}).get("eval", {}).get("blocks") for r in runs])
        else:
            nmi = pur = used = ""
        row_name = key.split(" [")[0]
        mins = [r["rows"].get(row_name.split(" ")[0], {}).get("minutes") for r in runs]
        lines.append(
            f"| {label} | {' / '.join(scoring.ci_cell(scoring.cell(d, key)) for d in groups['heldout'])} | "
            f"{vs('heldout', 'vs_random')} | {vs('heldout', 'vs_baseline')} | "
            + " | ".join(" / ".join(scoring.ci_cell(scoring.cell(d, key, h)) for d in groups["heldout"]) for h in heldout)
            + f" | {' / '.join(scoring.ci_cell(scoring.cell(d, key)) for d in groups['corpus'])} | "
            f"{vs('corpus', 'vs_random')} | {vs('corpus', 'vs_baseline')} | {nmi} | {pur} | {used} | "
            + (" / ".join(f"{m:.1f}" for m in mins) if not reference and all(m is not None for m in mins) else "")
            + " |")
    rnd = [r["rows"].get("random_init_dex", {}).get("eval", {}).get("blocks") for r in runs]
    if all(rnd):
        vals = [np.mean([b["nmi"] for b in x.values()]) for x in rnd]
        cells = ["random routers (untrained DEX)", *[""] * (6 + len(heldout)),
                 " / ".join(f"{v:.3f}" for v in vals), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if all(r["rows"].get("dex") for r in runs):
        lines += ["", "Per block (" + " / ".join(f"seed {r['meta']['seed']}" for r in runs)
                  + "), DEX experts mode: NMI, purity, experts used, max load:", ""]
        for name in runs[0]["rows"]["dex"]["eval"]["blocks"]:
            cells = []
            for r in runs:
                b = r["rows"]["dex"]["eval"]["blocks"][name]
                cells.append(f"{b['nmi']:.3f}, {b['purity']:.3f}, {b['experts_used']}, {b['max_load']:.2f}")
            lines.append(f"- {name}: " + " / ".join(cells))
    lines += ["", "midol eval reports: " + "; ".join(
        f"seed {r['meta']['seed']}: " + ", ".join(f"`{r['rows']['probes'][g]['report']}`" for g in scoring.GROUPS)
        for r in runs)]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    ns = p.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in ns.files]
    old = [f for f, r in zip(ns.files, runs) if "probes" not in r["rows"]]
    if old:
        raise SystemExit(f"{', '.join(old)}: no midol eval probes (written before the port, or "
                         "the run did not finish); combine older files with the commit that wrote them")
    Path(ns.out).write_text(markdown(runs, ns.files, ns.out))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
