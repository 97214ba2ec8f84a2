"""DEX's director update (group EMA of the experts) with and without the host read-back of the
shares (issue 30 item 4): time per update on this machine, written as Markdown.

    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_group_ema.py --out experiments/results/bench_group_ema_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from timm.layers import Mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from midol.models.ema import group_ema_  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts = [Mlp(768, 3072) for _ in range(ns.experts)]  # ViT-B block MLPs
    director = Mlp(768, 3072).requires_grad_(False)
    rows = []
    for label, omega in (("all experts share", torch.softmax(torch.randn(ns.experts), 0)),
                         ("half the experts at 0", torch.cat([torch.softmax(torch.randn(ns.experts // 2), 0),
                                                               torch.zeros(ns.experts - ns.experts // 2)]))):
        for sync_free in (False, True):
            group_ema_(director, experts, omega, 0.99, sync_free=sync_free)  # warm-up
            start = time.perf_counter()
            for _ in range(ns.repeats):
                group_ema_(director, experts, omega, 0.99, sync_free=sync_free)
            ms = (time.perf_counter() - start) / ns.repeats * 1000
            rows.append(f"| {label} | {'device-side (no read-back)' if sync_free else 'read-back, skip zeros'} | {ms:.1f} |")
    text = "\n".join([
        "# DEX group EMA: with and without the host read-back of the shares",
        "",
        f"* Date: {datetime.date.today()}; device: CPU ({platform.machine()}, 1 thread), torch {torch.__version__}",
        f"* Command: `OMP_NUM_THREADS=1 python {' '.join(sys.argv)}`",
        f"* {ns.experts} experts of a ViT-B block MLP (768 -> 3072 -> 768), mean of {ns.repeats} updates.",
        "* On a GPU the read-back (`omega.tolist()`) waits for the step's kernels every step; the",
        "  device-side update (`addcmul_` with the share as a 0-dim tensor) never does. The GPU",
        "  figure is owed (no GPU in this session).",
        "",
        "| shares | update | ms per update |",
        "|---|---|---:|",
        *rows,
    ])
    Path(ns.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
