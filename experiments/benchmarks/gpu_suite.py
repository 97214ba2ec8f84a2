"""The GPU measurements of issue 6, sized for one short GPU lease (15 minutes of device time,
commands of at most 10 minutes, no network). ``run_gpu.sh`` drives it; each subcommand runs in
its own process under its own ``timeout``:

    gpu_suite.py missing-wheels        # which carried wheels this environment lacks (stdlib only)
    gpu_suite.py status ...            # merge one entry into $OUT/status.json (stdlib only)
    gpu_suite.py preflight --out DIR   # seconds: imports, CUDA, bf16, torch.compile, 2 midol steps
    gpu_suite.py section A --out DIR   # the eager table at batch 64 + the host-sync audit
    gpu_suite.py section B --out DIR   # compile / activation checkpointing / fused attention
    gpu_suite.py section C --out DIR   # what B leaves for a third call (optional)
    gpu_suite.py section D --out DIR   # DEX dispatch (loop/sorted/dense), plain MAE, compile

Every section writes ``DIR/gpu_<section>.json`` (rewritten after every row, so a killed section
keeps its finished rows) and ``DIR/gpu_<section>.md``. ``--device cpu --micro`` runs the same
rows with the tests' micro Swin, batch 2, one warm-up and two timed steps: the dry run that
``experiments/benchmarks/tests/test_gpu_suite_dry_run.py`` runs.

Per row: source images/s, ms/step, TFLOP/s, MFU against two peaks (``--peak-flops``, default
989e12 = H100/H200 SXM datasheet dense bf16; ``--measured-peak-flops``, default 790e12 = the
8192^3 bf16 matmul rate measured on this workplace's H200), peak GPU memory. FLOPs are counted
once per (implementation, views) at batch 2 (``torch.utils.flop_counter``, no compile or
checkpointing) and scaled linearly to the row's batch (the only super-linear terms, the B x B
logits of the losses, are under 0.1 % of a Swin-B step). Timing: ``--warmup`` steps (compile
included), then ``--repeats`` blocks of ``--iters`` steps between CUDA events (host clock on a
CPU); the median block is reported with the range. Rows run in priority order; a row whose
expected cost exceeds the section's remaining ``--budget-s`` is recorded as skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script (run_gpu.sh): the checkout, for experiments.benchmarks
    _ROOT = str(Path(__file__).resolve().parents[2])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

# The modules that do the work, by job (all import torch only when they run):
from experiments.benchmarks.gpu_measure import (  # noqa: E402
    DATASHEET_PEAK,
    FLOP_BATCH,
    MEASURED_PEAK,
    Suite,
)
from experiments.benchmarks.gpu_preflight import run_preflight  # noqa: E402
from experiments.benchmarks.gpu_rows import SECTIONS, Row  # noqa: E402
from experiments.benchmarks.gpu_section import run_section  # noqa: E402
from experiments.benchmarks.gpu_setup import (  # noqa: E402
    HERE,
    install_blocker,
    missing_wheels,
    read_wheel_list,
    record_status,
)

__all__ = ["DATASHEET_PEAK", "FLOP_BATCH", "MEASURED_PEAK", "SECTIONS", "Row", "Suite", "main",
           "missing_wheels", "parse_args", "read_wheel_list", "record_status", "run_preflight",
           "run_section"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("missing-wheels", help="print the wheels.txt lines this env lacks")
    w.add_argument("--list", type=Path, default=HERE / "wheels.txt")
    w.add_argument("--all", action="store_true", help="every line, installed or not")

    s = sub.add_parser("status", help="merge one entry into OUT/status.json")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--key", choices=("setup", "sections"), default="sections")
    s.add_argument("--name", required=True)
    s.add_argument("--status", required=True)
    s.add_argument("--rc", type=int, default=None)
    s.add_argument("--seconds", type=float, default=None)
    s.add_argument("--note", default="")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--device", default="cuda")
        q.add_argument("--micro", action="store_true",
                       help="the tests' micro Swin, batch 2, 1 warm-up + 2 timed steps")
        q.add_argument("--compile-backend", default=None,
                       help="default inductor; eager with --device cpu (no C++ compiler needed)")
        q.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default 1 with --device cpu: two threads on "
                       "two shared cores spin against each other)")

    pre = sub.add_parser("preflight", help="seconds: is everything there?")
    common(pre)

    sec = sub.add_parser("section", help="one section of the measurements")
    sec.add_argument("name", choices=sorted(SECTIONS))
    common(sec)
    sec.add_argument("--model", default="swin_base", help="step_impls preset (not with --micro)")
    sec.add_argument("--batch", type=int, default=None, help="default 64, 2 with --micro")
    sec.add_argument("--warmup", type=int, default=None, help="default 3, 1 with --micro")
    sec.add_argument("--iters", type=int, default=None, help="steps per timed block; "
                     "default 5, 1 with --micro")
    sec.add_argument("--repeats", type=int, default=None, help="timed blocks; default 3, "
                     "2 with --micro")
    sec.add_argument("--budget-s", type=float, default=270.0,
                     help="start no row whose expected cost exceeds what is left of this")
    sec.add_argument("--est-eager-s", type=float, default=None,
                     help="expected seconds of an eager row before one has run (default 30)")
    sec.add_argument("--est-compile-s", type=float, default=None,
                     help="expected seconds of a compiled row before one has run (default 150)")
    sec.add_argument("--peak-flops", type=float, default=DATASHEET_PEAK)
    sec.add_argument("--measured-peak-flops", type=float, default=MEASURED_PEAK)
    sec.add_argument("--no-oom-halve", dest="oom_halve", action="store_false",
                     help="on OOM, do not retry the row at half the batch")
    sec.add_argument("--check-flop-scaling", action=argparse.BooleanOptionalAction,
                     default=None, help="also count the first row's FLOPs at batch "
                     f"{2 * FLOP_BATCH} and compare with the scaled count (default: section A)")
    args = p.parse_args(argv)
    if args.command in ("preflight", "section"):
        cpu = args.device == "cpu"
        if args.compile_backend is None:
            args.compile_backend = "eager" if cpu else "inductor"
        if args.threads is None and cpu:
            args.threads = 1
    if args.command == "section":
        micro = args.micro
        for name, full, small in (("batch", 64, 2), ("warmup", 3, 1), ("iters", 5, 1),
                                  ("repeats", 3, 2), ("est_eager_s", 30.0, 5.0),
                                  ("est_compile_s", 150.0, 10.0)):
            if getattr(args, name) is None:
                setattr(args, name, small if micro else full)
        if args.check_flop_scaling is None:
            args.check_flop_scaling = args.name == "A"
        if min(args.warmup, args.iters, args.repeats, args.batch) < 1:
            p.error("--batch, --warmup, --iters and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "missing-wheels":
        print(" ".join(missing_wheels(args.list, args.all)))
        return 0
    if args.command == "status":
        entry = {"status": args.status, "rc": args.rc, "seconds": args.seconds}
        if args.note:
            entry["note"] = args.note
        record_status(args.out, args.key, args.name, entry)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    install_blocker()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "preflight":
        try:
            return run_preflight(args)
        except SystemExit as stop:
            return int(stop.code or 0)
    return run_section(args)


if __name__ == "__main__":
    sys.exit(main())
