"""Pre-training step benchmark (issue 6, items 1a and 1b; issue 30, item 1): source images/s,
achieved TFLOP/s, MFU, peak memory and host syncs of one optimiser step, for midol, the
M-IDoL authors' loop as it runs and lightly's ImageNet DINO benchmark (``step_impls.py``), on
the same backbone and synthetic uint8 views. ``midol-dinoce`` / ``authors`` and
``midol-dino`` / ``lightly`` are the same math (``--same-math`` reports their step-0 losses
from the same weights); ``authors-per-view`` and ``lightly-toy`` are the earlier per-view
restatements, kept as labelled extra rows.

    # the GPU table (Swin-B, both view settings, batch 32 and 64, compile and checkpointing)
    python experiments/benchmarks/bench_step.py --device cuda --model swin_base \\
        --out experiments/results/bench_step_h100.md
    # CPU smoke run (a tiny Swin, seconds)
    python experiments/benchmarks/bench_step.py --device cpu --model micro --batch 4 \\
        --impl midol authors lightly --compile off --ckpt off --warmup 1 --iters 2 --repeats 1
    # the same-math ratios on a CPU: interleaved rounds, syncs and step-0 losses
    python experiments/benchmarks/bench_step.py --device cpu --model tiny --batch 8 \\
        --views authors --impl midol-dinoce authors midol-dino lightly --compile off \\
        --ckpt off --threads 1 --rounds 3 --sync-audit --same-math

FLOPs are the model FLOPs of one step (forward + backward of every matmul, convolution and
attention; ``torch.utils.flop_counter``), counted once per (implementation, views, batch)
without compile or checkpointing, so checkpointing's recomputation is not counted as useful
work. MFU = achieved FLOP/s / the device's dense peak (datasheet bf16 on GPUs; on a CPU, the
measured float32 matmul rate of the threads in use, since a CPU has no useful datasheet figure).
Timing: ``--warmup`` steps (compilation included), then ``--repeats`` blocks of ``--iters``
steps, each block timed between two device synchronisations; the table gives the median block
and the range. The data pipeline is not part of the step (see ``bench_pipeline.py``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    datasheet_tflops,
    fmt_spread,
    header,
    markdown_table,
    matmul_peak_tflops,
    median_spread,
    python_command,
    synchronize,
)
from step_impls import (  # noqa: E402
    AUTHORS_VIEWS_ONLY,
    IMPLS,
    PRESETS,
    SAME_MATH,
    VIEW_SETTINGS,
    Case,
    make_batches,
    run_case,
    same_math_losses,
)

BENCH_DIR = str(Path(__file__).resolve().parent) + "/"
# The earlier per-view restatements: extra rows, not the code people run.
PER_VIEW_ROWS = ("authors-per-view", "lightly-toy")


@dataclass
class Result:
    case: Case
    status: str = "ok"
    step_s: list[float] = field(default_factory=list)  # per block: seconds per step
    flops_per_step: float | None = None
    peak_mem_gib: float | None = None
    syncs_per_step: float | None = None
    sync_sites: list[str] = field(default_factory=list)

    def images_per_s(self) -> list[float]:
        return [self.case.batch / s for s in self.step_s]


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    cases = []
    for impl, views, batch in itertools.product(args.impl, args.views, args.batch):
        if impl in AUTHORS_VIEWS_ONLY and views != "authors":
            continue  # the authors' loop runs with every view at the global size
        if impl.startswith("midol"):
            for comp, ckpt in itertools.product(args.compile, args.ckpt):
                cases.append(Case(impl, views, batch, comp == "on", ckpt == "on"))
        else:
            cases.append(Case(impl, views, batch))
    return cases


def _free(device: torch.device) -> None:
    """Between cases: compiled graphs and cached device memory go (a CPU needs neither)."""
    if device.type == "cuda":
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_flops(case: Case, args: argparse.Namespace, device: torch.device) -> float:
    plain = Case(case.impl, case.views, case.batch)
    batches = make_batches(PRESETS[args.model], case.views, case.batch, device, count=1)
    counter = FlopCounterMode(display=False)
    with counter:
        run_case(plain, PRESETS[args.model], batches, 1, lambda i: None, device)
    return float(counter.get_total_flops())


def forward_gflops(preset_name: str) -> dict[int, float]:
    """GFLOP of one backbone forward per view, at the global and the local size."""
    from midol.models import build_backbone

    preset = PRESETS[preset_name]
    model = build_backbone(preset.backbone, preset.backbone_kwargs).eval()
    out = {}
    for size in (preset.global_size, preset.local_size):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, size, size))
        out[size] = counter.get_total_flops() / 1e9
    return out


def flops_report(args: argparse.Namespace) -> str:
    """``--flops-only``: FLOPs per view and per step, no timing (any device, batch 1)."""
    device = torch.device(args.device)
    lines = header("Pre-training step FLOPs", device, python_command())
    per_view = forward_gflops(args.model)
    lines += [f"* backbone `{PRESETS[args.model].backbone}` forward: " + ", ".join(
        f"{v:.2f} GFLOP per {k} px view" for k, v in per_view.items()), ""]
    rows = []
    for impl, views in dict.fromkeys((c.impl, c.views) for c in cases_from_args(args)):
        flops = count_flops(Case(impl, views, 1), args, device)
        rows.append([impl, views, f"{flops / 1e9:.4g}"])
    lines += markdown_table(["impl", "views", "GFLOP per source image per step"], rows)
    return "\n".join(lines) + "\n"


def time_case(case: Case, args: argparse.Namespace, device: torch.device) -> Result:
    result = Result(case)
    preset = PRESETS[args.model]
    batches = make_batches(preset, case.views, case.batch, device)
    marks: dict[int, float] = {}
    ends = {args.warmup - 1 + k * args.iters for k in range(args.repeats + 1)}

    def on_step_end(i: int) -> None:
        if i in ends:
            synchronize(device)
            marks[i] = time.perf_counter()

    steps = args.warmup + args.repeats * args.iters
    run_case(case, preset, batches, steps, on_step_end, device)
    stamps = [marks[i] for i in sorted(marks)]
    result.step_s = [(b - a) / args.iters for a, b in zip(stamps, stamps[1:])]
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _in_optimizer_step_counter() -> bool:
    """Whether the current op is torch.optim's ``_get_value`` of a step counter: a CPU tensor
    for non-fused AdamW on CUDA too (fused AdamW reads none), so never a device read."""
    return any(f.name == "_get_value" and "torch/optim/" in f.filename
               for f in traceback.extract_stack(limit=12))


def _step_audit_class() -> type:
    from sync_audit import _ALWAYS_SYNC, _BOOL_INDEX, _INTERNAL, SyncAudit, _has_bool_index, aten

    def site(code_roots: tuple[str, ...]) -> str:
        """sync_audit's ``_site``, skipping this harness's own frames."""
        stack = [f for f in traceback.extract_stack()
                 if not f.filename.endswith(("bench_step.py", *_INTERNAL))]
        for frame in reversed(stack):
            root = next((r for r in code_roots if frame.filename.startswith(r)), None)
            if root is not None:
                return f"{frame.filename[len(root):]}:{frame.lineno} {frame.name}"
        for frame in reversed(stack):
            return f"[{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}]"
        return "[unknown]"

    class StepAudit(SyncAudit):
        """``SyncAudit`` without the optimiser's step-counter reads (see above)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            counted = func in _ALWAYS_SYNC or (func in _BOOL_INDEX and _has_bool_index(args))
            if counted and not (func is aten._local_scalar_dense.default
                                and _in_optimizer_step_counter()):
                name = str(func.overloadpacket.__name__)
                if func in _BOOL_INDEX:
                    name += "[bool mask]"
                self.report.counts[(name, site(self.code_roots))] += 1
            return func(*args, **(kwargs or {}))

    return StepAudit


def audit_syncs(case: Case, args: argparse.Namespace, device: torch.device) -> tuple[float, list[str]]:
    """Host synchronisations per steady-state step (steps 2 and 3 of 4) of any implementation:
    CUDA's sync debug mode on a GPU, the dispatch-level audit (``sync_audit.py``) on a CPU.
    The audit starts at the end of step 1 (for Lightning runs: at the start of step 2, after
    step 1's EMA) and ends after the last step."""
    from sync_audit import _MIDOL_ROOT

    _StepAudit = _step_audit_class()

    preset = PRESETS[args.model]
    batches = make_batches(preset, case.views, case.batch, device)
    steps = 4
    if device.type == "cuda":
        def hook(i: int) -> None:
            if i == 1:
                torch.cuda.set_sync_debug_mode("warn")
            elif i == steps - 1:
                torch.cuda.set_sync_debug_mode("default")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run_case(case, preset, batches, steps, hook, device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(
            f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
            for w in caught if "synchroniz" in str(w.message)
        )
        lines = [f"{n:5d}  {site}" for site, n in sites.most_common()]
        return sum(sites.values()) / (steps - 2), lines
    audit = _StepAudit(code_roots=(_MIDOL_ROOT, BENCH_DIR))

    def cpu_hook(i: int) -> None:
        if i == 1:
            audit.__enter__()
        elif i == steps - 1:
            audit.__exit__(None, None, None)

    run_case(case, preset, batches, steps, cpu_hook, device)
    report = audit.report
    # Their MultiCropWrapper reads a CPU tensor of view sizes (unique_consecutive, slicing by
    # its values): no device read on a GPU either.
    host_only = [k for k in report.counts if "_multi_crop" in k[1]]
    lines = []
    for line in report.lines(steps - 2):
        if "step_impls.py" in line:  # sync_audit's notes describe midol's sites, not these
            line = line.split("  <- ")[0]
        if "_multi_crop" in line:
            line += "  <- a CPU tensor in their code: no device read"
        lines.append(line)
    for key in host_only:
        del report.counts[key]
    return report.on_gpu() / (steps - 2), lines


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float, str, float]:
    """(peak used for MFU, where it comes from, measured matmul rate)."""
    if device.type == "cuda":
        measured = matmul_peak_tflops(device, torch.bfloat16, 8192, 20)
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_tflops(name)
        if args.peak_tflops:
            return args.peak_tflops, "--peak-tflops", measured
        if sheet is not None:
            return sheet, f"datasheet dense bf16 of {name}", measured
        return measured, "measured bf16 matmul (no datasheet value known)", measured
    measured = matmul_peak_tflops(device, torch.float32, 1024, 10)
    return (args.peak_tflops or measured), "measured float32 matmul on the same threads", measured


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    cases = cases_from_args(args)
    results = {case: Result(case) for case in cases}
    flops_cache: dict[tuple[str, str, int], float] = {}
    # Rounds: every case once per round, so that a change of the machine's load during the run
    # (a shared CPU) spreads over all cases instead of favouring the ones that ran when it was low;
    # odd rounds run the list backwards, so a steady drift of the load cancels between cases.
    for round_ in range(args.rounds):
        for case in (cases if round_ % 2 == 0 else cases[::-1]):
            result = results[case]
            if result.status != "ok":
                continue
            _free(device)
            key = (case.impl, case.views, case.batch)
            try:
                if key not in flops_cache:
                    flops_cache[key] = count_flops(case, args, device)
                    _free(device)
                timed = time_case(case, args, device)
                result.step_s += timed.step_s
                if timed.peak_mem_gib is not None:
                    result.peak_mem_gib = max(result.peak_mem_gib or 0.0, timed.peak_mem_gib)
                result.flops_per_step = flops_cache[key]
                if round_ == 0 and args.sync_audit:
                    _free(device)
                    result.syncs_per_step, result.sync_sites = audit_syncs(case, args, device)
            except torch.OutOfMemoryError:
                result.status = "OOM"
            except Exception as err:  # noqa: BLE001 - one failing case must not lose the table
                result.status = f"error: {type(err).__name__}: {str(err)[:200]}"
            print(f"round {round_}: {case.label} {case.views} b{case.batch}: {result.status} "
                  f"{[round(x, 1) for x in result.images_per_s()]} img/s", flush=True)
    return list(results.values())


def report(results: list[Result], args: argparse.Namespace, peak: tuple[float, str, float]) -> str:
    device = torch.device(args.device)
    peak_used, source, measured = peak
    lines = header("Pre-training step benchmark", device, python_command())
    lines += [
        f"* model preset: `{args.model}` ({PRESETS[args.model].backbone}, views "
        f"{PRESETS[args.model].global_size}/{PRESETS[args.model].local_size} px), "
        f"warm-up {args.warmup} steps, then {args.repeats} blocks of {args.iters} timed steps, "
        f"in each of {args.rounds} round(s) over all cases",
        f"* MFU peak: {peak_used:.3g} TFLOP/s ({source}); measured large-matmul rate "
        f"{measured:.3g} TFLOP/s",
        "* views: `dino` = 2 global + 6 local at the local size; `authors` = all 8 at the "
        "global size; the teacher sees the 2 global views in both",
        "* same math: `midol-dinoce` and `authors` (the M-IDoL authors' loop as it runs: "
        "grouped views, per-parameter clipping with its host reads, their Sinkhorn, fp16 on "
        "CUDA); `midol-dino` and `lightly` (lightly's ImageNet DINO benchmark: grouped views, "
        "16-mixed on CUDA). `authors-per-view` and `lightly-toy` are the earlier per-view "
        "restatements: extra rows only (step_impls.py)",
        "",
    ]
    rows = []
    for r in results:
        c = r.case
        impl = f"{c.impl} (old per-view restatement)" if c.impl in PER_VIEW_ROWS else c.impl
        if r.status != "ok":
            rows.append([impl, c.views, c.batch, "on" if c.compile else "off",
                         "on" if c.ckpt else "off", r.status, "", "", "", "", ""])
            continue
        step_med = median_spread(r.step_s)[0]
        tflops = [r.flops_per_step / s / 1e12 for s in r.step_s]
        rows.append([
            impl, c.views, c.batch, "on" if c.compile else "off", "on" if c.ckpt else "off",
            fmt_spread(r.images_per_s(), 1),
            f"{step_med * 1e3:.1f}",
            f"{r.flops_per_step / c.batch / 1e9:.3g}",
            fmt_spread(tflops, 3 if max(tflops) < 10 else 1),
            f"{100 * median_spread(tflops)[0] / peak_used:.1f} %",
            f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "n/a (CPU)",
        ])
    lines += markdown_table(
        ["impl", "views", "batch", "compile", "ckpt", "source img/s (median, range)",
         "ms/step", "GFLOP/img", "TFLOP/s", "MFU", "peak mem GiB"],
        rows,
    )
    audited = [r for r in results if r.syncs_per_step is not None]
    if audited:
        lines += ["", "## Host synchronisations per steady-state step", "",
                  "Per step; on a CPU the count leaves out the optimiser's step-counter reads "
                  "(a CPU tensor on CUDA as well) and cannot see explicit synchronisations "
                  "or blocking copies: on CUDA the authors' loop adds one "
                  "`torch.cuda.synchronize()` and one GradScaler read (`found_inf`) per step, "
                  "lightly's 16-mixed one GradScaler read. Cases with the same list are "
                  "grouped.", ""]
        groups: dict[tuple[str, ...], list[Result]] = {}
        for r in audited:
            groups.setdefault(tuple(r.sync_sites), []).append(r)
        for sites, members in groups.items():
            names = ", ".join(f"{r.case.label} {r.case.views} b{r.case.batch}" for r in members)
            lines += [f"* {members[0].syncs_per_step:.1f} per step: {names}", "", "```"]
            lines += list(sites) or ["(none)"]
            lines += ["```", ""]
    lines += ["", "Ratios (same views and batch; median images/s, and the best blocks' ratio; the "
              "best midol variant):", ""]
    lines += ratio_lines(results, args.repeats if args.rounds > 1 else None)
    return "\n".join(lines) + "\n"


# (midol variant, reference, what the pair compares)
_PAIRS = (
    ("midol-dinoce", "authors", "same math: the authors' code"),
    ("midol", "authors", "paper default (InfoNCE) vs the authors' loop"),
    ("midol-dino", "lightly", "same math: plain DINO as lightly's benchmark"),
    ("midol-dinoce", "authors-per-view", "old per-view restatement, top-1 MoE: not the same math"),
    ("midol-dino", "lightly-toy", "old per-view restatement of lightly's toy example"),
)
assert {(a, b) for a, b, _ in _PAIRS} >= set(SAME_MATH)


def ratio_lines(results: list[Result], repeats: int | None = None) -> list[str]:
    """Per pair: the ratio of median images/s and, less sensitive to a shared machine's load
    spikes, of the best block's (best-of). With ``repeats`` (blocks per case and round, every
    round complete) also the paired ratio: per round, the two cases' median block (they ran
    minutes apart at most), then the median and range of those ratios over rounds."""
    best: dict[tuple[str, str, int], tuple[float, float, Result]] = {}
    for r in results:
        if r.status != "ok":
            continue
        ips = r.images_per_s()
        med, top = median_spread(ips)[0], max(ips)
        key = (r.case.impl, r.case.views, r.case.batch)
        if key not in best or med > best[key][0]:
            best[key] = (med, top, r)
    out = []

    def per_round(r: Result) -> list[float]:
        ips = r.images_per_s()
        return [median_spread(ips[k:k + repeats])[0] for k in range(0, len(ips), repeats or 1)]

    def ratio(ours: tuple[float, float, Result], ref: tuple[float, float, Result]) -> str:
        text = f"{ours[0] / ref[0]:.2f}x (best-of {ours[1] / ref[1]:.2f}x"
        a, b = (per_round(ours[2]), per_round(ref[2])) if repeats else ([], [])
        if len(a) > 1 and len(a) == len(b):
            paired = [x / y for x, y in zip(a, b)]
            text += f"; paired by round {fmt_spread(paired, 2)}x over {len(paired)} rounds"
        return text + ")"

    for (impl, views, batch), mine in sorted(best.items()):
        for ours, other, what in _PAIRS:
            ref = best.get((other, views, batch))
            if impl == ours and ref is not None:
                out.append(f"* {mine[2].case.label} / {other} ({views} views, batch {batch}; "
                           f"{what}): {ratio(mine, ref)}")
        ref = best.get(("authors", "authors", batch))
        if impl == "midol" and views == "dino" and ref is not None:
            out.append(f"* {mine[2].case.label} in the dino setting / authors' step in theirs "
                       f"(batch {batch}): {ratio(mine, ref)}")
    return out or ["* (no pair to compare)"]


def same_math_section(args: argparse.Namespace, device: torch.device) -> str:
    """Markdown: the step-0 loss of each implementation from the same weights and batch."""
    lines = ["", "## Same math: step-0 loss from the same weights and batch", "",
             f"Preset `{args.model}`, batch {args.batch[0]}; gate noise and stochastic depth "
             "off (their random draws differ between loops); `authors-grouped=False` is the "
             "authors' loop with one backbone call per view.", ""]
    for views in args.views:
        losses = same_math_losses(args.model, args.batch[0], views, device)
        rows = [[views, name, f"{value:.7f}"] for name, value in losses.items()]
        for ours, ref in SAME_MATH:
            diff = abs(losses[ours] - losses[ref]) / abs(losses[ref])
            rows.append([views, f"{ours} vs {ref}", f"relative difference {diff:.1e}"])
        lines += markdown_table(["views", "impl", "step-0 loss"], rows) + [""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=sorted(PRESETS), default="swin_base")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--views", choices=VIEW_SETTINGS, nargs="+", default=list(VIEW_SETTINGS))
    p.add_argument("--impl", choices=IMPLS, nargs="+", default=list(IMPLS))
    p.add_argument("--compile", choices=("off", "on"), nargs="+", default=["off", "on"])
    p.add_argument("--ckpt", choices=("off", "on"), nargs="+", default=["off", "on"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per case and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole case list this many times (a shared machine's load "
                   "then spreads over all cases); blocks of all rounds are pooled")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the MFU peak")
    p.add_argument("--sync-audit", action="store_true",
                   help="also count host synchronisations per step of the midol cases")
    p.add_argument("--same-math", action="store_true",
                   help="also report the step-0 losses of the same-math pairs from the same "
                   "weights and batch (gate noise and stochastic depth off), first --batch")
    p.add_argument("--flops-only", action="store_true",
                   help="only count FLOPs per view and per step (batch 1), no timing")
    p.add_argument("--out", type=Path, default=None, help="markdown report path")
    p.add_argument("--json", type=Path, default=None, help="raw results as JSON")
    args = p.parse_args(argv)
    if min(args.warmup, args.iters, args.repeats, args.rounds) < 1:
        p.error("--warmup, --iters, --repeats and --rounds must be >= 1")
    if {"lightly", "lightly-toy"} & set(args.impl):
        try:
            import lightly  # noqa: F401
        except ImportError:
            p.error("--impl lightly needs lightly: pip install -e '.[bench]'")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.flops_only:
        text = flops_report(args)
        results: list[Result] = []
    else:
        peak = peak_tflops(args, device)
        results = run(args)
        text = report(results, args, peak)
        if args.same_math:
            text += same_math_section(args, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    print(text)
    return text


if __name__ == "__main__":
    main()
