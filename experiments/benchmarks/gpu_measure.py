"""How one row is measured: the peaks and the FLOP batch, timm's fused attention and the
compile backend in this process, the step marks (CUDA events, host clock on a CPU), and
``Suite``: one section's device, preset and FLOP cache, which times a row (images/s, ms/step,
TFLOP/s, MFU against two peaks, peak memory), audits a row's host synchronisations and checks
that FLOPs counted at batch 2 scale linearly. torch is imported only when a ``Suite`` is built.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import statistics
import time
from collections.abc import Iterator
from typing import Any

from experiments.benchmarks.gpu_rows import Row
from experiments.benchmarks.gpu_setup import add_paths

DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16, vendor datasheet
MEASURED_PEAK = 790e12  # 8192^3 bf16 matmul on random data, this workplace's H200
FLOP_BATCH = 2  # FLOPs are counted at this batch and scaled linearly


@contextlib.contextmanager
def fused_attention(enabled: bool) -> Iterator[None]:
    """What ``TIMM_FUSED_ATTN=2`` does, in this process: timm reads the variable once into the
    flag that ``set_fused_attn`` sets, and each attention module reads the flag when built."""
    if not enabled:
        yield
        return
    from timm.layers import config, set_fused_attn

    before = config._USE_FUSED_ATTN
    set_fused_attn(True, experimental=True)
    try:
        yield
    finally:
        config._USE_FUSED_ATTN = before


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """PretrainModule calls ``nn.Module.compile(dynamic=False)`` (inductor); the CPU dry run
    swaps in a backend that needs no C++ compiler (dynamo still traces the real step)."""
    import torch

    if backend == "inductor":
        yield
        return
    original = torch.nn.Module.compile

    def patched(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = patched
    try:
        yield
    finally:
        torch.nn.Module.compile = original


class StepMarks:
    """``on_step_end`` hook of step_impls: a CUDA event (host clock on a CPU) at the end of
    the warm-up and of every timed block; no synchronisation until the run is over."""

    def __init__(self, device, warmup: int, iters: int, repeats: int) -> None:
        self.device, self.iters = device, iters
        self.ends = {warmup - 1 + k * iters for k in range(repeats + 1)}
        self.marks: dict[int, Any] = {}

    def __call__(self, i: int) -> None:
        if i not in self.ends:
            return
        import torch

        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[i] = event
        else:
            self.marks[i] = time.perf_counter()

    def block_seconds(self) -> list[float]:
        """Seconds per step of each timed block."""
        import torch

        marks = [self.marks[i] for i in sorted(self.marks)]
        if len(marks) != len(self.ends):
            raise RuntimeError(f"expected {len(self.ends)} step marks, got {len(marks)}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 / self.iters for a, b in itertools.pairwise(marks)]
        return [(b - a) / self.iters for a, b in itertools.pairwise(marks)]


class Suite:
    """One section's process: the device, the preset, the FLOP cache and the output files."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        add_paths()
        import bench_step
        import step_impls

        self.bench_step, self.step_impls = bench_step, step_impls
        self.preset_name = "micro" if args.micro else args.model
        self.preset = step_impls.PRESETS[self.preset_name]
        self.flops_b2: dict[tuple[str, str], float] = {}
        self.has_lightly = importlib.util.find_spec("lightly") is not None

    def free(self) -> None:
        """Between runs on a GPU: compiled graphs, cached memory and the peak statistic go.
        (Not on a CPU: a collection of this heap takes 0.3 s, and a CPU run frees nothing.)"""
        torch = self.torch
        if self.device.type == "cuda":
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def case(self, row: Row, batch: int):
        return self.step_impls.Case(row.impl, row.views, batch, row.compile, row.ckpt)

    def flops_per_step(self, row: Row, batch: int) -> float:
        key = (row.impl, row.views)
        if key not in self.flops_b2:
            plain = self.step_impls.Case(row.impl, row.views, FLOP_BATCH)
            ns = argparse.Namespace(model=self.preset_name)
            self.flops_b2[key] = self.bench_step.count_flops(plain, ns, self.device)
            self.free()
        return self.flops_b2[key] * batch / FLOP_BATCH

    def time_row(self, row: Row, batch: int) -> dict[str, Any]:
        a, torch = self.args, self.torch
        out: dict[str, Any] = {}
        flops = self.flops_per_step(row, batch)  # frees after a count; the loop after a row
        batches = self.step_impls.make_batches(self.preset, row.views, batch, self.device)
        marks = StepMarks(self.device, a.warmup, a.iters, a.repeats)
        steps = a.warmup + a.repeats * a.iters
        with fused_attention(row.fused_attn), compile_backend(a.compile_backend):
            if row.fused_attn:
                from timm.layers import use_fused_attn

                out["fused_attn_active"] = use_fused_attn(experimental=True)
            self.step_impls.run_case(self.case(row, batch), self.preset, batches, steps, marks,
                                     self.device)
        step_s = marks.block_seconds()
        ips = [batch / s for s in step_s]
        tflops = [flops / s / 1e12 for s in step_s]
        med_s = statistics.median(step_s)
        out.update(
            status="ok", steps_timed=a.repeats * a.iters, step_s=step_s,
            step_ms=med_s * 1e3, images_per_s=batch / med_s, images_per_s_min=min(ips),
            images_per_s_max=max(ips), flops_per_step=flops, flops_counted_at_batch=FLOP_BATCH,
            flops_per_image=flops / batch, tflops=flops / med_s / 1e12,
            tflops_min=min(tflops), tflops_max=max(tflops),
            mfu=flops / med_s / a.peak_flops, mfu_measured_peak=flops / med_s / a.measured_peak_flops,
        )
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        else:
            out["peak_mem_gib"] = None  # no allocator statistics on a CPU
        return out

    def audit_row(self, row: Row, batch: int) -> dict[str, Any]:
        ns = argparse.Namespace(model=self.preset_name)
        per_step, sites = self.bench_step.audit_syncs(self.case(row, batch), ns, self.device)
        how = "torch.cuda.set_sync_debug_mode('warn')" if self.device.type == "cuda" \
            else "sync_audit.py dispatch audit (CPU)"
        return {"status": "ok", "syncs_per_step": per_step, "sync_sites": sites, "audit": how}


def flop_scaling_check(suite: Suite, row: Row) -> dict[str, Any]:
    """Is the batch-2 count, scaled, what a count at twice that batch gives?"""
    batch = 2 * FLOP_BATCH
    scaled = suite.flops_per_step(row, batch)
    ns = argparse.Namespace(model=suite.preset_name)
    counted = suite.bench_step.count_flops(
        suite.step_impls.Case(row.impl, row.views, batch), ns, suite.device)
    suite.free()
    return {"impl": row.impl, "views": row.views, "batch": batch, "scaled": scaled,
            "counted": counted, "rel_diff": scaled / counted - 1}
