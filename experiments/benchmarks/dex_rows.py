"""The GPU suite's DEX and plain-MAE rows (section D, issue 30 item 5): ``DEX`` under a
Lightning ``Trainer`` as ``midol fit`` runs it (bf16 autocast on CUDA), one view per image.

Implementations: ``mae`` (``use_dex: false``, the baseline DEX claims to beat), ``dex-loop``,
``dex-sorted``, ``dex-dense``, ``dex-grouped`` (``dex_dispatch``,
:class:`midol.models.dex.DEXLayer`). A row's ``compile`` is ``compile: true`` with the method's
``compile_scope: auto``: the whole step for ``mae``, ``dex-dense`` and ``dex-grouped``, the
decoder only for ``loop``/``sorted``. Every row trains under bf16 autocast (``bf16-mixed``),
on a CPU too: the dry run then takes the GPU's code path (the grouped GEMM compiles in bf16
only). Presets: ``vit_base``
(DEX's ViT-B/16, E = 8, top-2, decoder 512 x 8, at 224 px) and ``micro`` (the tests' tiny DEX,
for the CPU dry run). Timing, FLOP counting and the host-sync audit are those of the other
rows (``gpu_measure.py``), with this module's step in place of ``step_impls``'.
"""

from __future__ import annotations

import statistics
import warnings
from typing import Any

from experiments.benchmarks.gpu_measure import FLOP_BATCH, StepMarks, compile_backend
from experiments.benchmarks.gpu_rows import Row

IMPLS = ("mae", "dex-loop", "dex-sorted", "dex-dense", "dex-grouped")
VIEWS = "mae"  # one view per image, MAE's masking inside the step
PRESETS: dict[str, dict[str, Any]] = {
    "vit_base": dict(backbone="vit_base_patch16_224", img_size=224, num_experts=8, top_k=2,
                     decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "micro": dict(backbone="vit_tiny_patch16_224",
                  backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2),
                  img_size=32, num_experts=4, top_k=2, decoder_dim=32, decoder_depth=1,
                  decoder_heads=2),
}
_FLOPS: dict[tuple[str, str], float] = {}  # (impl, preset) -> FLOPs of a step at FLOP_BATCH


def preset_name(suite: Any) -> str:
    return "micro" if suite.preset_name == "micro" else "vit_base"


def dex_module(impl: str, compile: bool, ckpt: bool, preset: str):
    """The DEX method of a row (``compile: true`` with ``compile_scope: auto``)."""
    from midol.methods import DEX

    if impl not in IMPLS:
        raise ValueError(f"unknown DEX row implementation {impl!r}; choose from {IMPLS}")
    use_dex = impl != "mae"
    return DEX(**PRESETS[preset], use_dex=use_dex,
               dex_dispatch=impl.removeprefix("dex-") if use_dex else "loop",
               compile=compile, grad_checkpointing=ckpt, warmup_epochs=0)


def make_batches(preset: str, batch: int, device, count: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` batches of random uint8 images (one view each) on the device."""
    import torch

    size = PRESETS[preset]["img_size"]
    g = torch.Generator().manual_seed(seed)
    return [{"views": [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                                     generator=g).to(device)], "skipped": []}
            for _ in range(count)]


def run_dex(impl: str, compile: bool, ckpt: bool, preset: str, batches: list[dict[str, Any]],
            steps: int, on_step_end, device, callbacks: list | None = None) -> None:
    """``steps`` optimiser steps of the row's DEX under a Trainer, as ``step_impls.run_midol``."""
    import lightning as L
    import torch
    from step_impls import _Batches, _StepHookCallback

    module = dex_module(impl, compile, ckpt, preset)
    trainer = L.Trainer(
        accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=50,
        callbacks=[_StepHookCallback(on_step_end), *(callbacks or [])],
    )
    loader = torch.utils.data.DataLoader(_Batches(batches, steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*logger.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train_dataloaders=loader)


def grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm`` (torch's counter has no formula for it): every row of
    the 2-D operand meets one group's matrix, so a grouped GEMM costs what one plain GEMM over
    all rows costs; the backward's 2-D x 2-D form (per-group outer products) likewise."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (M, K) x (E, K, N)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (K, M) x (M, N) -> (E, K, N)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # (E, M, K) x (K, N) -> (M, N)
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched (E, M, K) x (E, K, N)


def _register_grouped_mm_flops() -> None:
    import torch
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None and not {op, op.default} & set(flop_counter.flop_registry):
        flop_counter.register_flop_formula(op)(grouped_mm_flops)


def flops_per_step(suite: Any, row: Row, batch: int) -> float:
    """FLOPs of one eager step counted at FLOP_BATCH (``torch.utils.flop_counter``, with a
    formula for the grouped GEMM), scaled."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_grouped_mm_flops()

    preset = preset_name(suite)
    key = (row.impl, preset)
    if key not in _FLOPS:
        counter = FlopCounterMode(display=False)
        with counter:
            run_dex(row.impl, False, False, preset,
                    make_batches(preset, FLOP_BATCH, suite.device, count=1), 1, lambda i: None,
                    suite.device)
        _FLOPS[key] = float(counter.get_total_flops())
        suite.free()
    return _FLOPS[key] * batch / FLOP_BATCH


def time_row(suite: Any, row: Row, batch: int) -> dict[str, Any]:
    """What ``Suite.time_row`` records, for a DEX/MAE row."""
    a, torch = suite.args, suite.torch
    preset = preset_name(suite)
    flops = flops_per_step(suite, row, batch)
    batches = make_batches(preset, batch, suite.device)
    marks = StepMarks(suite.device, a.warmup, a.iters, a.repeats)
    steps = a.warmup + a.repeats * a.iters
    with compile_backend(a.compile_backend):
        run_dex(row.impl, row.compile, row.ckpt, preset, batches, steps, marks, suite.device)
    step_s = marks.block_seconds()
    ips = [batch / s for s in step_s]
    tflops = [flops / s / 1e12 for s in step_s]
    med_s = statistics.median(step_s)
    out: dict[str, Any] = dict(
        status="ok", steps_timed=a.repeats * a.iters, step_s=step_s, step_ms=med_s * 1e3,
        images_per_s=batch / med_s, images_per_s_min=min(ips), images_per_s_max=max(ips),
        flops_per_step=flops, flops_counted_at_batch=FLOP_BATCH, flops_per_image=flops / batch,
        tflops=flops / med_s / 1e12, tflops_min=min(tflops), tflops_max=max(tflops),
        mfu=flops / med_s / a.peak_flops, mfu_measured_peak=flops / med_s / a.measured_peak_flops,
        dex_preset=preset,
    )
    if suite.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(suite.device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(suite.device) / 2**30
    else:
        out["peak_mem_gib"] = None
    return out


def audit_row(suite: Any, row: Row, batch: int) -> dict[str, Any]:
    """Host synchronisations per steady-state step (steps 2-3 of 4): CUDA's sync debug mode
    on a GPU, ``sync_audit.py``'s dispatch audit on a CPU (as ``bench_step.audit_syncs``)."""
    import torch

    preset = preset_name(suite)
    batches = make_batches(preset, batch, suite.device)
    steps, device = 4, suite.device
    if device.type == "cuda":
        from collections import Counter

        def hook(i: int) -> None:
            if i == 1:
                torch.cuda.set_sync_debug_mode("warn")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run_dex(row.impl, False, False, preset, batches, steps, hook, device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
                        for w in caught if "synchroniz" in str(w.message))
        per_step = sum(sites.values()) / (steps - 2)
        lines = [f"{n:5d}  {site}" for site, n in sites.most_common()]
        how = "torch.cuda.set_sync_debug_mode('warn')"
    else:
        from sync_audit import SyncAuditCallback

        callback = SyncAuditCallback(first_step=2)
        run_dex(row.impl, False, False, preset, batches, steps, lambda i: None, device,
                callbacks=[callback])
        n = max(callback.steps, 1)
        per_step, lines = callback.report.on_gpu() / n, callback.report.lines(n)
        how = "sync_audit.py dispatch audit (CPU)"
    return {"status": "ok", "syncs_per_step": per_step, "sync_sites": lines, "audit": how,
            "dex_preset": preset}


def section_meta(suite: Any) -> dict[str, Any]:
    """The section's model line for DEX rows (the Swin preset's does not apply)."""
    preset = preset_name(suite)
    size = PRESETS[preset]["img_size"]
    return {"preset": f"dex:{preset}", "backbone": PRESETS[preset]["backbone"],
            "views_px": [size, size], "dex_options": dict(PRESETS[preset])}


def is_dex_row(row: Row) -> bool:
    return row.impl in IMPLS


__all__ = ["IMPLS", "PRESETS", "VIEWS", "audit_row", "dex_module", "flops_per_step",
           "is_dex_row", "make_batches", "run_dex", "section_meta", "time_row"]

