"""Small-scale DEX study: DEX vs the plain-MAE baseline (same tiny ViT, budget and data) on the
five-modality corpus of ../shared/data, each pre-trained per seed, then

* a linear probe of frozen pooled features on the held-out MedMNIST sets (AUC) and on the
  corpus' labelled sets (accuracy), for DEX in director mode and in routed-experts mode;
* per block: routing NMI / purity vs modality, experts used and max load over the corpus.

A random-init row (the same ViT, no pre-training) is the reference. Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/dex/run_dex_study.py --seed 0 --out experiments/results/dex_<date>_seed0.md
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

from evaluate import (  # noqa: E402
    HELDOUT_PROBES, PROBES, EvalSet, folder_classes, linear_probe, npz_classes, probe_auc, routing_set,
)

from midol.analysis.cluster_metrics import routing_report  # noqa: E402
from midol.cli import main as midol_main  # noqa: E402
from midol.config_compose import merge  # noqa: E402
from midol.data.sources import DataSource  # noqa: E402
from midol.methods import DEX  # noqa: E402
from midol.methods.loading import load_method  # noqa: E402

BASE = REPO / "experiments/dex/base.yaml"
SHARED = REPO / "experiments/ablations/shared_data.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"
ROWS = {"dex": {"use_dex": True}, "mae": {"use_dex": False}}


@torch.no_grad()
def features(module: DEX, data: EvalSet, mode: str, batch_size: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pooled features in ``mode`` and (experts mode) every block's per-image top-1 expert."""
    module.eval()
    if module.dex_layers():
        module.set_mode(mode)  # type: ignore[arg-type]
    feats, experts = [], {}
    for start in range(0, len(data.images), batch_size):
        chunk = data.images[start:start + batch_size]
        if mode == "experts" and module.dex_layers():
            f, routes = module.route(chunk)
            for name, r in routes.items():
                experts.setdefault(name, []).append(r.expert)
        else:
            f = module.embed(chunk)
        feats.append(f.float())
    return torch.cat(feats).numpy(), {k: torch.cat(v).numpy() for k, v in experts.items()}


def evaluate(module: DEX, routing: EvalSet, probes: dict[str, EvalSet], heldout: dict[str, EvalSet],
             seed: int) -> dict[str, Any]:
    modes = ["director", "experts"] if module.dex_layers() else ["dense"]
    out: dict[str, Any] = {}
    for mode in modes:
        res: dict[str, Any] = {"heldout": {}, "probes": {}}
        for name, data in heldout.items():
            f, _ = features(module, data, mode)
            res["heldout"][name] = probe_auc(f, data.labels, seed)
        for name, data in probes.items():
            f, _ = features(module, data, mode)
            res["probes"][name] = linear_probe(f, data.labels, seed)[0]
        res["heldout_mean_auc"] = float(np.mean(list(res["heldout"].values())))
        res["probe_mean_acc"] = float(np.mean(list(res["probes"].values())))
        out[mode] = res
    if module.dex_layers():
        _, experts = features(module, routing, "experts")
        blocks = {}
        for name, e in experts.items():
            counts = np.zeros((module.num_experts, len(routing.names)), dtype=np.int64)
            np.add.at(counts, (e, routing.labels), 1)
            rep = routing_report(counts, routing.names)
            blocks[name] = {k: rep[k] for k in ("nmi", "purity", "experts_used", "max_load")}
        out["blocks"] = blocks
    if module.dex_layers():
        module.set_mode("director")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--rows", default="dex,mae")
    p.add_argument("--per-modality", type=int, default=200)
    ns = p.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    shared = yaml.safe_load(SHARED.read_text())
    base = merge(yaml.safe_load(BASE.read_text()), {"data": {"init_args": {"sources": shared["data"]["init_args"]["sources"]}}})
    size = base["data"]["init_args"]["transform"]["init_args"]["size"]
    sources = [DataSource(**s) for s in base["data"]["init_args"]["sources"]]
    routing = routing_set(sources, size, ns.per_modality, ns.seed)
    probes = {name: folder_classes(SHARED_DATA / rel, size) for name, rel in PROBES.items()}
    heldout = {name: npz_classes(SHARED_DATA / rel, size) for name, rel in HELDOUT_PROBES.items()}
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores shared, 1 torch thread, torch {torch.__version__}",
        "command": "OMP_NUM_THREADS=1 python experiments/dex/run_dex_study.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "steps": ns.max_epochs * base["data"]["init_args"]["samples_per_epoch"] // base["data"]["init_args"]["batch_size"],
    }
    results: dict[str, Any] = {}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ns.seed)
    random_init = DEX(**{**base["model"]["init_args"], "use_dex": False})
    results["random_init"] = {"eval": evaluate(random_init, routing, probes, heldout, ns.seed)}
    torch.manual_seed(ns.seed)  # an untrained DEX: the routing NMI of random routers
    results["random_init_dex"] = {"eval": evaluate(DEX(**base["model"]["init_args"]), routing, probes,
                                                   heldout, ns.seed)}
    for row in ns.rows.split(","):
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
        module = load_method(out / "checkpoints" / "last.ckpt")
        results[row] = {"eval": evaluate(module, routing, probes, heldout, ns.seed),
                        "minutes": (time.time() - start) / 60}
        print(f"[dex-study] {row}: {json.dumps(results[row]['eval'], default=float)[:400]}", flush=True)
        Path(ns.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=float))
    Path(ns.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=float))
    print(f"wrote {Path(ns.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
