"""One section (``gpu_suite.py section A|B|C``): its rows in priority order within the time
budget, an OOM retried at half the batch (later rows in the same views start there), a SIGTERM
from ``timeout`` recorded on the running row, and ``gpu_<section>.json`` and ``.md`` rewritten
after every row.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from experiments.benchmarks import dex_rows
from experiments.benchmarks.gpu_machine import machine_meta, nvidia_smi
from experiments.benchmarks.gpu_measure import FLOP_BATCH, Suite, flop_scaling_check
from experiments.benchmarks.gpu_report import markdown
from experiments.benchmarks.gpu_rows import SECTIONS, Row, row_record
from experiments.benchmarks.gpu_setup import write_json


class SectionTimeout(BaseException):
    """SIGTERM from run_gpu.sh's ``timeout``: mark the running row, write, leave."""


def _on_sigterm(signum, frame) -> None:
    raise SectionTimeout


def _estimate(row: Row, done: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """Expected seconds for a row: the slowest finished row of its kind, else a default."""
    kind = row.kind
    seen = [d["wall_s"] for d in done if d.get("kind") == kind and d["status"] == "ok"]
    if seen:
        return max(seen)
    defaults = {"eager": args.est_eager_s, "compile": args.est_compile_s,
                "audit": args.est_eager_s}
    return defaults[kind]


def run_section(args: argparse.Namespace) -> int:
    name = args.name
    title, plan = SECTIONS[name]
    out_dir: Path = args.out
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_section(args, name, title, plan, out_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_section(args: argparse.Namespace, name: str, title: str, plan: list[Row],
                 out_dir: Path) -> int:
    t0 = time.monotonic()
    suite = Suite(args)
    torch = suite.torch
    meta = machine_meta(suite.device)
    if suite.device.type == "cuda":
        from common import matmul_peak_tflops

        meta["matmul_bf16_tflops_now"] = matmul_peak_tflops(suite.device, torch.bfloat16, 8192, 20)
    meta.update(
        section=name, title=title, preset=suite.preset_name, backbone=suite.preset.backbone,
        views_px=[suite.preset.global_size, suite.preset.local_size], batch=args.batch,
        warmup=args.warmup, iters=args.iters, repeats=args.repeats, budget_s=args.budget_s,
        peak_flops=args.peak_flops, measured_peak_flops=args.measured_peak_flops,
        compile_backend=args.compile_backend, flops_counted_at_batch=FLOP_BATCH,
        timing="CUDA events" if suite.device.type == "cuda" else "host clock",
    )
    if all(dex_rows.is_dex_row(row) for row in plan):  # section D: the DEX model's line
        meta.update(dex_rows.section_meta(suite))
    if args.check_flop_scaling and not dex_rows.is_dex_row(plan[0]):
        meta["flop_scaling_check"] = flop_scaling_check(suite, plan[0])
    rows: list[dict[str, Any]] = []
    data = {"section": name, "meta": meta, "rows": rows, "finished": False}
    json_path, md_path = out_dir / f"gpu_{name}.json", out_dir / f"gpu_{name}.md"

    def save() -> None:
        data["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_json(json_path, data)
        md_path.write_text(markdown(data))

    suite.free()  # the matmul rate's buffers and the peak statistic
    queue = [(row, args.batch) for row in plan]
    code = 0
    index = 0
    oom: dict[str, tuple[int, int]] = {}  # views -> (batch that ran out of memory, row)
    while queue:
        row, batch = queue.pop(0)
        index += 1
        start_note = None
        if args.oom_halve and not row.audit and row.views in oom and batch >= oom[row.views][0]:
            # Another implementation ran out of memory at this batch in these views: the same
            # activations here, so start at half of it instead of paying for a second OOM.
            start_note = f"batch {batch} not tried: OOM at batch {oom[row.views][0]} in row " \
                         f"{oom[row.views][1]}"
            batch = oom[row.views][0] // 2
        rec = row_record(name, index, row, batch)
        if start_note:
            rec["note"] = start_note
        left = args.budget_s - (time.monotonic() - t0)
        need = _estimate(row, rows, args)
        if row.impl == "lightly" and not suite.has_lightly:
            rec["status"] = "skipped: lightly not importable (carry its wheel, wheels.txt)"
        elif need > left:
            rec["status"] = f"skipped: budget (needs ~{need:.0f} s, {max(left, 0):.0f} s left)"
        else:
            start = time.monotonic()
            rows.append(rec)
            rec["status"] = "running"
            save()
            try:
                if dex_rows.is_dex_row(row):  # section D: DEX's own step (dex_rows.py)
                    rec.update(dex_rows.audit_row(suite, row, batch) if row.audit
                               else dex_rows.time_row(suite, row, batch))
                else:
                    rec.update(suite.audit_row(row, batch) if row.audit else suite.time_row(row, batch))
            except SectionTimeout:
                rec["status"] = "killed: section timeout"
                rec["wall_s"] = round(time.monotonic() - start, 1)
                code = 124
                break
            except torch.OutOfMemoryError:
                rec["status"] = "OOM"
            except Exception as err:  # noqa: BLE001 - one failing row must not lose the table
                msg = f"{type(err).__name__}: {str(err)[:300]}"
                rec["status"] = "OOM" if "out of memory" in msg.lower() else f"error: {msg}"
            if rec["status"] == "OOM" and not row.audit:
                oom[row.views] = min((batch, index), oom.get(row.views, (batch, index)))
                if batch > 1 and args.oom_halve:
                    queue.insert(0, (row, batch // 2))
            rec["wall_s"] = round(time.monotonic() - start, 1)
            suite.free()
            what = (f"{rec['syncs_per_step']:.1f} syncs/step" if "syncs_per_step" in rec
                    else f"{rec.get('images_per_s', 0):.1f} img/s")
            print(f"[{name} {index}] {row.label} {row.views} b{batch}: {rec['status']} {what}, "
                  f"{rec['wall_s']} s", flush=True)
            save()
            continue
        rows.append(rec)
        print(f"[{name} {index}] {row.label} {row.views} b{batch}: {rec['status']}", flush=True)
    for row, batch in queue:  # left by a timeout
        index += 1
        rows.append({**row_record(name, index, row, batch), "status": "not run: section timeout"})
    if code == 0:
        data["finished"] = True
        if suite.device.type == "cuda":
            meta["nvidia_smi_after"] = nvidia_smi()
    save()
    print(md_path.read_text(), flush=True)
    return code
