"""New runs score with midol eval: this reads run_ablations.py JSON files written since the port (older files: use the commit that wrote them).

One table from several seeds' run_ablations.py JSON files: per row the held-out linear-probe AUC
with its 95 % CI and midol eval's paired verdict against the same seed's random init, the corpus
probe, routing and loss columns.

    python experiments/ablations/combine_seeds.py A_seed0.json A_seed1.json --out A.md --title "..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import scoring  # noqa: E402


def f(x: Any, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def markdown(runs: list[dict[str, Any]], files: list[str], out: str, title: str) -> str:
    seeds = [r["meta"]["seed"] for r in runs]
    by_name = [{row["name"]: row for row in r["rows"]} for r in runs]
    names = [row["name"] for row in runs[0]["rows"] if row.get("probes")]
    m = runs[0]["meta"]
    heldout = list(m["heldout_tasks"])
    lines = [
        f"# {title}", "",
        f"- Date: {m['date']}; device: {m['device']}; commit {m['commit']}.",
        "- Commands: " + "; ".join(f"`{r['meta']['command']}`" for r in runs)
        + f"; combined with `python experiments/ablations/combine_seeds.py {' '.join(files)} --out {out}`.",
        f"- {m['steps']} optimiser steps per row ({m['epochs']} epochs x {m['samples_per_epoch']} draws, batch 32), "
        "configs/ablations/base.yaml + experiments/ablations/shared_data.yaml + the row of rows.yaml.",
        f"- Probes: {m['probe_method']}. Held out (not in the corpus, no setting chosen on them): "
        + ", ".join(heldout) + f"; corpus tasks: {', '.join(m['corpus_tasks'])}. "
        "`vs random init`: paired difference with the random init of the same architecture at the "
        "same seed, pooled over the group's tasks, and its verdict.",
        "- Values are seed " + " / seed ".join(str(s) for s in seeds) + ".",
        "",
        "| row | held-out linear AUC (mean of tasks) | vs random init (held-out) | "
        + " | ".join(f"{h} [95 % CI]" for h in heldout)
        + " | corpus linear AUC (mean of tasks) | vs random init (corpus) | routing NMI | purity | experts used | max load | L_route start -> end | L_cst start -> end | teacher change |",
        "|" + "---|" * (12 + len(heldout)),
    ]
    for name in names:
        found = [b.get(name) for b in by_name]
        rows = [r for r in found if r is not None and r.get("probes")]
        if len(rows) != len(found):
            continue
        ho = [r["probes"]["heldout"] for r in rows]
        co = [r["probes"]["corpus"] for r in rows]
        route = [r["eval"]["routing"] for r in rows]
        lines.append(
            f"| {rows[0]['label']} | {' / '.join(scoring.ci_cell(scoring.cell(d, name)) for d in ho)} | "
            f"{' / '.join(scoring.verdict_cell(scoring.versus(d, name)) for d in ho)} | "
            + " | ".join(" / ".join(scoring.ci_cell(scoring.cell(d, name, h)) for d in ho) for h in heldout)
            + f" | {' / '.join(scoring.ci_cell(scoring.cell(d, name)) for d in co)}"
            f" | {' / '.join(scoring.verdict_cell(scoring.versus(d, name)) for d in co)}"
            f" | {' / '.join(f(x.get('nmi')) if x['experts_used'] > 1 else '1 expert' for x in route)}"
            f" | {' / '.join(f(x.get('purity')) for x in route)}"
            f" | {' / '.join(str(x['experts_used']) + '/' + str(x['experts']) for x in route)}"
            f" | {' / '.join(f(x['max_load'], 2) for x in route)}"
            f" | {' / '.join(f(r.get('l_route_start'), 1) + ' -> ' + f(r.get('l_route'), 1) for r in rows)}"
            f" | {' / '.join(f(r.get('l_cst_start'), 2) + ' -> ' + f(r.get('l_cst'), 2) for r in rows)}"
            f" | {' / '.join(f(r.get('teacher_change'), 3) for r in rows)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="M-IDoL rows with a held-out probe")
    ns = p.parse_args()
    runs = [json.loads(Path(x).read_text()) for x in ns.files]
    old = [x for x, r in zip(ns.files, runs) if "heldout_tasks" not in r["meta"]]
    if old:
        raise SystemExit(f"{', '.join(old)}: written before the studies scored with midol eval; "
                         "combine them with the commit that wrote them")
    Path(ns.out).write_text(markdown(runs, ns.files, ns.out, ns.title))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
