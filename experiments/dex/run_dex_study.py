"""New runs score their probes with midol eval (experiments/scoring.py); older results files used a 5-fold CV probe.

Small-scale DEX study: DEX vs the plain-MAE baseline (same tiny ViT, budget and data) on the
five-modality corpus of ../shared/data, each pre-trained per seed, then

* midol eval of the frozen backbones on configs/eval/shared_data.yaml (kNN and linear probes,
  95 % bootstrap CIs, class-token and mean-patch read-outs; held-out MedMNIST tasks apart from
  the corpus tasks): the plain MAE (``ckpt``), DEX in director mode (``ckpt:director``) and in
  routed-experts mode (``ckpt:experts``), each paired with the random init of the ViT at the
  study's seed (the reference) and with the plain MAE (the baseline);
* per block: routing NMI / purity vs modality, experts used and max load over the corpus.

An untrained DEX gives the routing of random routers. Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/dex/run_dex_study.py --seed 0 --out experiments/results/dex_<date>_seed0.md

midol eval's reports are written to outputs/dex_study/eval_seed<seed>/{heldout,corpus}/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "ablations"))

from evaluate import EvalSet, routing_set  # noqa: E402

from experiments import scoring  # noqa: E402  (evaluate put the repository on sys.path)
from midol.cli import main as midol_main  # noqa: E402
from midol.config_compose import merge  # noqa: E402
from midol.data.sources import DataSource  # noqa: E402
from midol.methods import DEX  # noqa: E402
from midol.methods.loading import load_method  # noqa: E402
from midol.utils.cluster_metrics import routing_report  # noqa: E402

BASE = REPO / "experiments/dex/base.yaml"
SHARED = REPO / "experiments/ablations/shared_data.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"
ROWS = {"dex": {"use_dex": True}, "mae": {"use_dex": False}}
BASELINE = "mae"


def backbones(row: str, checkpoint: Path) -> list[tuple[str, str]]:
    """midol eval backbones of a row: the plain MAE's ViT, DEX's director and experts parts."""
    if row == "dex":
        return [("dex director", f"{checkpoint}:director"), ("dex experts", f"{checkpoint}:experts")]
    return [(row, str(checkpoint))]


@torch.no_grad()
def block_experts(module: DEX, data: EvalSet, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Every DEX block's per-image top-1 expert (routed-experts mode, no noise)."""
    module.eval()
    experts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(data.images), batch_size):
        _, routes = module.route(data.images[start:start + batch_size])
        for name, r in routes.items():
            experts.setdefault(name, []).append(r.expert)
    return {k: torch.cat(v).numpy() for k, v in experts.items()}


def routing_blocks(module: DEX, routing: EvalSet) -> dict[str, Any]:
    """Per block: NMI / purity of the top-1 expert vs modality, experts used, max load."""
    blocks = {}
    for name, e in block_experts(module, routing).items():
        counts = np.zeros((module.num_experts, len(routing.names)), dtype=np.int64)
        np.add.at(counts, (e, routing.labels), 1)
        rep = routing_report(counts, routing.names)
        blocks[name] = {k: rep[k] for k in ("nmi", "purity", "experts_used", "max_load")}
    module.set_mode("director")
    return blocks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--rows", default="dex,mae")
    p.add_argument("--per-modality", type=int, default=200)
    p.add_argument("--protocols", default="knn,linear", help="midol eval protocols (knn, linear, fewshot)")
    p.add_argument("--bootstrap", type=int, default=1000, help="midol eval bootstrap resamples")
    ns = p.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    shared = yaml.safe_load(SHARED.read_text())
    base = merge(yaml.safe_load(BASE.read_text()), {"data": {"init_args": {"sources": shared["data"]["init_args"]["sources"]}}})
    size = base["data"]["init_args"]["transform"]["init_args"]["size"]
    sources = [DataSource(**s) for s in base["data"]["init_args"]["sources"]]
    routing = routing_set(sources, size, ns.per_modality, ns.seed)
    rows = ns.rows.split(",")
    options = scoring.study_options(ns.protocols, bootstrap=ns.bootstrap,
                                    baseline=BASELINE if BASELINE in rows and len(rows) > 1 else None)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores shared, 1 torch thread, torch {torch.__version__}",
        "command": "OMP_NUM_THREADS=1 python experiments/dex/run_dex_study.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "steps": ns.max_epochs * base["data"]["init_args"]["samples_per_epoch"] // base["data"]["init_args"]["batch_size"],
        "seed": ns.seed, "probe_method": scoring.method_text(options),
        "heldout_tasks": list(scoring.HELDOUT_TASKS), "baseline": options.baseline,
    }
    results: dict[str, Any] = {}
    out_json = Path(ns.out).with_suffix(".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=float))

    torch.manual_seed(ns.seed)  # an untrained DEX: the routing NMI of random routers
    results["random_init_dex"] = {"eval": {"blocks": routing_blocks(DEX(**base["model"]["init_args"]), routing)}}
    scored: list[tuple[str, str]] = []
    for row in rows:
        out = REPO / "outputs" / "dex_study" / f"{row}_seed{ns.seed}"
        cfg = copy.deepcopy(merge(base, {"model": {"init_args": ROWS[row]}}))
        cfg["seed_everything"] = ns.seed
        cfg["trainer"].update(max_epochs=ns.max_epochs, default_root_dir=str(out))
        cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out)
        if (out / "checkpoints").exists():
            raise SystemExit(f"{out}/checkpoints exists from an earlier run: remove it first")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        start = time.time()
        midol_main(["fit", "--config", str(out / "config.yaml")])
        ckpt = out / "checkpoints" / "last.ckpt"
        module = load_method(ckpt)
        results[row] = {"eval": {"blocks": routing_blocks(module, routing)} if module.dex_layers() else {},
                        "minutes": (time.time() - start) / 60, "checkpoint": str(ckpt)}
        scored += backbones(row, ckpt)
        print(f"[dex-study] {row}: trained in {results[row]['minutes']:.1f} min", flush=True)
        save()
    start = time.time()
    results["probes"] = scoring.score_groups(scored, REPO / "outputs" / "dex_study" / f"eval_seed{ns.seed}",
                                             options=options, reference_seed=ns.seed, command=meta["command"])
    results["probe_minutes"] = (time.time() - start) / 60
    for label, _ in scored:
        keys = [k for k in results["probes"]["heldout"]["rows"] if k.split(" [")[0] == label]
        print(f"[dex-study] {label}: held-out linear AUC "
              + ", ".join(f"{k} {scoring.ci_cell(scoring.cell(results['probes']['heldout'], k))}" for k in keys),
              flush=True)
    save()
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
