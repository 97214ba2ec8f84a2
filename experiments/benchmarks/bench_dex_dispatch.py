"""DEX expert dispatch (issue 30 item 4): CPU seconds per DEX block and per DEX training step
for ``loop`` (one ``torch.where`` per expert), ``sorted`` (one read-back of E sizes per block),
``dense`` (every expert on every row, no read-back) and ``grouped`` (one grouped GEMM per MLP
layer, no read-back), with the host reads each makes per
step (``sync_audit.py``'s count, the ops that would wait for a GPU).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/bench_dex_dispatch.py \
        --out experiments/results/dex_dispatch_cpu_<date>.md

Block: one ``DEXLayer`` forward + backward + deferred update (training mode, noise on), as a
block of DEX runs it. Step: ``DEX.training_step`` (MAE encoder with DEX layers, decoder,
L_MAE + L_co + L_bal) + backward + the layers' commits, outside Lightning, no optimiser.
Timing: one warm-up each, then ``--repeats`` rounds in which every dispatch runs once
(interleaved, so a load change on the shared machine hits all alike); the best round is
reported with the median. Single thread.

``--inductor NAME``: also the step of preset NAME with ``dense`` dispatch and ``compile: true``
(``compile_scope: auto`` = the whole step, inductor, float32), against eager ``loop`` and
``dense``: first-step seconds (the compile) and the graphs dynamo made. (``grouped`` compiles
in bf16 only, so not on this float32 CPU run.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: the checkout, for midol and experiments
    _ROOT = str(Path(__file__).resolve().parents[2])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from experiments.benchmarks.sync_audit import SyncAudit  # noqa: E402
from midol.methods import DEX  # noqa: E402
from midol.models.dex import DISPATCHES, DEXLayer, set_dex_dispatch  # noqa: E402

# name -> (dim, hidden, experts, top_k, batch, tokens per image)
BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    # the tests' tiny DEX: 32 px, patch 8, 75 % masked -> 4 visible + class token
    "tiny": (32, 128, 4, 2, 8, 5),
    # ViT-S/16 at 224 px (paper's E = 8, k = 2): 49 visible + class token
    "vit_s": (384, 1536, 8, 2, 16, 50),
}
# name -> DEX options
STEPS: dict[str, dict[str, Any]] = {
    "tiny": dict(backbone="vit_tiny_patch16_224",
                 backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2),
                 img_size=32, num_experts=4, top_k=2, decoder_dim=32, decoder_depth=1,
                 decoder_heads=2, batch=8),
    "vit_s": dict(backbone="vit_small_patch16_224", img_size=224, num_experts=8, top_k=2,
                  decoder_dim=256, decoder_depth=2, decoder_heads=8, batch=8),
}


def block_runner(name: str, dispatch: str) -> tuple[Callable[[], None], Callable[[], Any]]:
    """A DEX block's training forward + backward + update, and one call of it under audit."""
    dim, hidden, experts, top_k, batch, tokens = BLOCKS[name]
    torch.manual_seed(0)
    layer = DEXLayer(dim, hidden, num_experts=experts, top_k=top_k, dispatch=dispatch).train()
    layer.defer_updates = True
    layer.noise_std = 1.0
    x = torch.randn(batch, tokens, dim, requires_grad=True)

    def run() -> None:
        torch.manual_seed(1)  # the same routing for every dispatch
        layer(x).sum().backward()
        layer.commit()
        layer.zero_grad(set_to_none=True)

    return run, run


def step_runner(name: str, dispatch: str, compile: bool = False
                ) -> tuple[Callable[[], None], Callable[[], Any]]:
    options = dict(STEPS[name])
    batch = options.pop("batch")
    torch.manual_seed(0)
    model = DEX(warmup_epochs=0, compile=compile, **options).train()
    model._total_steps = 1000
    if compile:
        model.configure_model()  # what the Trainer calls: compiles compile_targets()
    set_dex_dispatch(model.vit, dispatch)  # type: ignore[arg-type]
    for layer in model.dex_layers():
        layer.noise_std = 1.0
    size = options["img_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def run() -> None:
        torch.manual_seed(1)
        out = model.training_step({"views": [images]}, 0)
        assert out is not None
        out["loss"].backward()
        for layer in model.dex_layers():
            layer.commit()
        model.zero_grad(set_to_none=True)

    return run, run


def measure(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    for run in runners.values():
        run()  # warm-up (allocations, first-call costs)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    return times


def syncs(audited: Callable[[], Any]) -> tuple[int, list[str]]:
    with SyncAudit() as audit:
        audited()
    return audit.report.total, audit.report.lines()


def inductor_lines(name: str, repeats: int) -> list[str]:
    """The step of ``name``: eager loop and dense, and dense with the whole step compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    lines = [f"## step `{name}` compiled: `compile: true`, dense dispatch, whole step (inductor)", "",
             "| step | first step s | best ms | median ms | vs eager loop (best) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = None
    for label, dispatch, compiled in (("loop, eager", "loop", False), ("dense, eager", "dense", False),
                                      ("dense, compiled whole step", "dense", True)):
        run, _ = step_runner(name, dispatch, compiled)
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times = measure({label: run}, repeats)[label]
        base = base or min(times)
        lines.append(f"| {label} | {first:.1f} | {min(times) * 1e3:.2f} | "
                     f"{statistics.median(times) * 1e3:.2f} | {min(times) / base:.2f}x |")
    lines += ["", f"dynamo graphs made for the compiled step: {counters['stats']['unique_graphs']} "
              "(one graph: no break). Its routing noise comes from inductor's RNG, so its losses are "
              "not bit-equal to eager's; the eager-backend test (tests/methods/test_dex_compile.py) "
              "checks equality.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=list(BLOCKS))
    p.add_argument("--steps", nargs="*", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--dispatch", nargs="*", default=list(DISPATCHES), choices=list(DISPATCHES))
    p.add_argument("--inductor", nargs="*", default=[], choices=list(STEPS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    command = "OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/bench_dex_dispatch.py " \
        + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# DEX expert dispatch: CPU cost and host reads per block and per step", "",
        f"* date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"* device: 2-core CPU, shared ({platform.processor() or platform.machine()}), "
        f"1 torch thread, float32; torch {torch.__version__}",
        f"* command: `{command.strip()}`",
        f"* timing: 1 warm-up each, then {args.repeats} interleaved rounds; best (median) ms",
        "* host reads: `experiments/benchmarks/sync_audit.py` ops per call (what would make the "
        "host wait for a GPU), counted on one call",
        f"* load average before (1/5/15 min): {[round(v, 2) for v in os.getloadavg()]}", "",
    ]
    for kind, names, make in (("block", args.blocks, block_runner), ("step", args.steps, step_runner)):
        for name in names:
            built = {d: make(name, d) for d in args.dispatch}
            times = measure({d: r for d, (r, _) in built.items()}, args.repeats)
            if kind == "block":
                dim, hidden, e, k, b, n = BLOCKS[name]
                what = f"DEXLayer D={dim} H={hidden} E={e} k={k}, {b} images x {n} tokens"
            else:
                o = STEPS[name]
                what = (f"DEX.training_step `{o['backbone']}` {o['img_size']} px, E={o['num_experts']} "
                        f"k={o['top_k']}, decoder {o['decoder_dim']}x{o['decoder_depth']}, batch {o['batch']}")
            lines += [f"## {kind} `{name}`: {what}", "",
                      "| dispatch | best ms | median ms | vs loop (best) | host reads / call |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            base = min(times["loop"]) if "loop" in times else None
            sites: dict[str, list[str]] = {}
            for d, (_, audited) in built.items():
                count, where = syncs(audited)
                sites[d] = where
                best, med = min(times[d]) * 1e3, statistics.median(times[d]) * 1e3
                rel = f"{min(times[d]) / base:.2f}x" if base else "-"
                lines.append(f"| {d} | {best:.2f} | {med:.2f} | {rel} | {count} |")
            lines.append("")
            for d, where in sites.items():
                if where:
                    lines += [f"{d} read sites (count, op, site):", "", "```", *where, "```", ""]
            print("\n".join(lines[-12:]), flush=True)
    for name in args.inductor:
        lines += inductor_lines(name, args.repeats)
        print("\n".join(lines[-10:]), flush=True)
    lines.append(f"* load average after (1/5/15 min): {[round(v, 2) for v in os.getloadavg()]}")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
