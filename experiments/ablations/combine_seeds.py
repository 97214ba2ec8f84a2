"""One table from several seeds' run_ablations.py JSON files: per row the held-out probe AUC and
its gain over the same seed's random init, the corpus probe, routing and loss columns.

    python experiments/ablations/combine_seeds.py A_seed0.json A_seed1.json --out A.md --title "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def f(x: Any, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="M-IDoL rows with a held-out probe")
    ns = p.parse_args()
    runs = [json.loads(Path(x).read_text()) for x in ns.files]
    seeds = [r["meta"]["seed"] for r in runs]
    by_name = [{row["name"]: row for row in r["rows"]} for r in runs]
    names = [row["name"] for row in runs[0]["rows"]]
    heldout = list(runs[0]["rows"][0]["eval"]["heldout"])
    m = runs[0]["meta"]
    lines = [
        f"# {ns.title}", "",
        f"- Date: {m['date']}; device: {m['device']}; commit {m['commit']}.",
        "- Commands: " + "; ".join(f"`{r['meta']['command']}`" for r in runs)
        + f"; combined with `python experiments/ablations/combine_seeds.py {' '.join(ns.files)} --out {ns.out}`.",
        f"- {m['steps']} optimiser steps per row ({m['epochs']} epochs x {m['samples_per_epoch']} draws, batch 32), "
        "configs/ablations/base.yaml + experiments/ablations/shared_data.yaml + the row of rows.yaml.",
        "- Held-out probe: MedMNIST test splits not in the corpus (" + ", ".join(heldout)
        + "), macro AUC of a 5-fold logistic-regression probe on frozen teacher features. No setting was "
        "chosen on it. Gain = row - random init of the same seed.",
        "- Values are seed " + " / seed ".join(str(s) for s in seeds) + ".",
        "",
        "| row | held-out AUC mean | gain vs random init | " + " | ".join(heldout)
        + " | corpus probe acc | routing NMI | purity | experts used | max load | L_route start -> end | L_cst start -> end | teacher change |",
        "|" + "---|" * (11 + len(heldout)),
    ]
    for name in names:
        rows = [b.get(name) for b in by_name]
        if any(r is None for r in rows):
            continue
        ev = [r["eval"] for r in rows]
        gain = [e["heldout_mean_auc"] - b["random_init"]["eval"]["heldout_mean_auc"] for e, b in zip(ev, by_name)]
        route = [e["routing"] for e in ev]
        lines.append(
            f"| {rows[0]['label']} | {' / '.join(f(e['heldout_mean_auc']) for e in ev)} | "
            f"{' / '.join(f'{g:+.3f}' for g in gain)} | "
            + " | ".join(" / ".join(f(e["heldout"][h]["auc"]) for e in ev) for h in heldout)
            + f" | {' / '.join(f(e['probe_mean_acc']) for e in ev)}"
            f" | {' / '.join(f(x.get('nmi')) if x['experts_used'] > 1 else '1 expert' for x in route)}"
            f" | {' / '.join(f(x.get('purity')) for x in route)}"
            f" | {' / '.join(str(x['experts_used']) + '/' + str(x['experts']) for x in route)}"
            f" | {' / '.join(f(x['max_load'], 2) for x in route)}"
            f" | {' / '.join(f(r.get('l_route_start'), 1) + ' -> ' + f(r.get('l_route'), 1) for r in rows)}"
            f" | {' / '.join(f(r.get('l_cst_start'), 2) + ' -> ' + f(r.get('l_cst'), 2) for r in rows)}"
            f" | {' / '.join(f(r.get('teacher_change'), 3) for r in rows)} |"
        )
    Path(ns.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
