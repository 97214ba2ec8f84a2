"""Expert loads at the end of the eval study's M-IDoL-family runs (issue 26: "one expert took
72-87 % of the images"), from each run's own metrics.csv: the teacher router's top-1 share of the
largest expert (route_top1/max_load) at the first and last epoch, its NMI with the modality, the
experts used, and the Sinkhorn-balanced training assignment's largest share (route_epoch/max_load).

    python experiments/eval_study/routing_loads.py > experiments/results/routing_loads_2026-12-07.md
"""

from __future__ import annotations

import csv
import datetime
import glob
import sys

ROWS = ("midol", "midol_recommended", "midol_route_stopgrad", "moe_infonce_noroute", "midol_batch128")


def main() -> int:
    print("# Expert loads at the end of the eval study's runs (tiny Swin, 500 steps, five-modality corpus, 20 % draws each)")
    print()
    print(f"* Date: {datetime.date.today()}; command: `python {' '.join(sys.argv)}`; source: "
          "outputs/eval_study/<row>/seed<s>/logs/*/metrics.csv (logged by the routing monitor at each epoch end)")
    print()
    print("| row | seed | top-1 max load, first epoch | top-1 max load, last epoch | top-1 NMI | experts used | balanced max load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in ROWS:
        for seed in range(5):
            files = sorted(glob.glob(f"outputs/eval_study/{row}/seed{seed}/logs/*/metrics.csv"))
            if not files:
                continue
            with open(files[-1], newline="") as fh:
                rows = list(csv.DictReader(fh))
            top1 = [r for r in rows if r.get("route_top1/max_load")]
            balanced = [r for r in rows if r.get("route_epoch/max_load")]
            if not top1:
                continue
            first, last = top1[0], top1[-1]
            print(f"| {row} | {seed} | {float(first['route_top1/max_load']):.2f} | {float(last['route_top1/max_load']):.2f} | "
                  f"{float(last['route_top1/nmi']):.2f} | {int(float(last['route_top1/experts_used']))} | "
                  f"{float(balanced[-1]['route_epoch/max_load']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
