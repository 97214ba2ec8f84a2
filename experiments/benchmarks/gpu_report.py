"""The markdown of a section (``gpu_<section>.md``): the machine and method lines, the timed
rows' table (images/s with range, ms/step, GFLOP/image, TFLOP/s, MFU against both peaks, peak
memory, speed-up over the eager row), the host-sync audits and the ratios between
implementations.
"""

from __future__ import annotations

from typing import Any

from experiments.benchmarks.gpu_measure import FLOP_BATCH


def _f(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _scaling_lines(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    line = (f"* FLOP scaling check: {check['impl']} {check['views']}, the batch-{FLOP_BATCH} "
            f"count x {check['batch'] // FLOP_BATCH} vs a count at batch {check['batch']}: "
            f"{100 * check['rel_diff']:+.3f} %")
    return [line]


def markdown(data: dict[str, Any]) -> str:
    m, rows = data["meta"], data["rows"]
    v = m["versions"]
    lines = [
        f"# GPU benchmark, section {data['section']}: {m['title']}",
        "",
        f"* date: {m['date']}; finished: {data['finished']}; elapsed {data.get('elapsed_s')} s",
        f"* device: {m['device']}" + (f" ({m['device_memory_gib']} GiB, capability "
                                      f"{m['capability']}, CUDA {m['cuda']})"
                                      if "capability" in m else ""),
        (f"* software: python {v['python']}, torch {v['torch']}, timm {v['timm']}, lightning "
         f"{v['lightning']}, albumentations {v['albumentations']}, lightly {v['lightly']}"),
        f"* command: `{m['command']}`",
        (f"* model preset `{m['preset']}` ({m['backbone']}, views {m['views_px'][0]}/"
         f"{m['views_px'][1]} px), batch {m['batch']}; warm-up {m['warmup']} steps, then "
         f"{m['repeats']} blocks of {m['iters']} steps timed with {m['timing']}"),
        (f"* FLOPs: counted once per (impl, views) at batch {m['flops_counted_at_batch']} "
         "(torch.utils.flop_counter, no compile or checkpointing) and scaled linearly"),
        f"* MFU: against {m['peak_flops'] / 1e12:.0f} TFLOP/s (datasheet dense bf16) and "
        f"{m['measured_peak_flops'] / 1e12:.0f} TFLOP/s (bf16 matmul measured on an H200 here)"
        + (f"; bf16 8192^3 matmul now: {m['matmul_bf16_tflops_now']:.0f} TFLOP/s"
           if "matmul_bf16_tflops_now" in m else "; a CPU run: MFU is against GPU peaks"),
        *_scaling_lines(m.get("flop_scaling_check")),
        f"* load average before (1/5/15 min): {m['load_average']}",
        "",
    ]
    timed = [r for r in rows if r["kind"] != "audit"]
    ref = {(r["impl"], r["views"], r["batch"]): r["images_per_s"] for r in timed
           if r["status"] == "ok" and not (r["compile"] or r["ckpt"] or r["fused_attn"])}
    head = ["#", "impl", "views", "batch", "compile", "ckpt", "fused attn", "status",
            "source img/s (median, range)", "ms/step", "GFLOP/img", "TFLOP/s",
            f"MFU ({m['peak_flops'] / 1e12:.0f})", f"MFU ({m['measured_peak_flops'] / 1e12:.0f})",
            "peak mem GiB", "vs eager", "wall s"]
    table = []
    for r in timed:
        cells = [r["row"], r["impl"], r["views"], r["batch"], "on" if r["compile"] else "off",
                 "on" if r["ckpt"] else "off", "on" if r["fused_attn"] else "off", r["status"]]
        if r["status"] == "ok":
            base = ref.get((r["impl"], r["views"], r["batch"]))
            cells += [
                f"{r['images_per_s']:.1f} ({r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f})",
                _f(r["step_ms"]), f"{r['flops_per_image'] / 1e9:.4g}",
                _f(r["tflops"], 1 if r["tflops"] >= 10 else 3), f"{100 * r['mfu']:.1f} %",
                f"{100 * r['mfu_measured_peak']:.1f} %",
                _f(r.get("peak_mem_gib")) or "n/a (CPU)",
                f"{r['images_per_s'] / base:.2f}x" if base else "", _f(r.get("wall_s")),
            ]
        else:
            cells += [""] * 8 + [_f(r.get("wall_s"))]
        table.append(cells)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    audits = [r for r in rows if r["kind"] == "audit"]
    if audits:
        lines += ["", "## Host synchronisations per steady-state step", ""]
        for r in audits:
            if r["status"] != "ok":
                lines += [f"* {r['impl']} {r['views']} b{r['batch']}: {r['status']}"]
                continue
            head_line = (f"* {r['impl']} {r['views']} b{r['batch']}: "
                         f"{r['syncs_per_step']:.1f} per step ({r['audit']})")
            lines += [head_line, "", "```", *(r["sync_sites"] or ["(none)"]), "```"]
    ratios = _ratios(timed)
    if ratios:
        lines += ["", "## Ratios (median source images/s, same views and batch)", "", *ratios]
    return "\n".join(lines) + "\n"


_PAIRS = (
    ("midol-dinoce", "authors", "same math (MoE + DINO cross-entropy)"),
    ("midol", "authors", "paper default (InfoNCE) vs the authors' loop"),
    ("midol-dino", "lightly", "same math (plain DINO)"),
)


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    best: dict[tuple[str, str, int], tuple[float, str]] = {}
    for r in rows:
        if r["status"] == "ok":
            key = (r["impl"], r["views"], r["batch"])
            if key not in best or r["images_per_s"] > best[key][0]:
                best[key] = (r["images_per_s"], r["label"])
    out = []
    for (impl, views, batch), (ips, label) in sorted(best.items()):
        for ours, other, what in _PAIRS:
            ref = best.get((other, views, batch))
            if impl == ours and ref:
                out.append(f"* {label} / {other} ({views} views, batch {batch}; {what}): "
                           f"{ips / ref[0]:.2f}x")
        theirs = sorted((b, v[0]) for (i, vw, b), v in best.items()
                        if i == "authors" and vw == "authors")
        if impl == "midol" and views == "dino" and theirs:
            same = [t for t in theirs if t[0] == batch]
            their_batch, their_ips = (same or theirs)[-1]
            out.append(f"* {label} in the dino setting (batch {batch}) / the authors' step in "
                       f"theirs (batch {their_batch}): {ips / their_ips:.2f}x")
    return out
