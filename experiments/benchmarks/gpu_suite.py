"""The GPU measurements of issue 6, sized for one short GPU lease (15 minutes of device time,
commands of at most 10 minutes, no network). ``run_gpu.sh`` drives it; each subcommand runs in
its own process under its own ``timeout``:

    gpu_suite.py missing-wheels        # which carried wheels this environment lacks (stdlib only)
    gpu_suite.py status ...            # merge one entry into $OUT/status.json (stdlib only)
    gpu_suite.py preflight --out DIR   # seconds: imports, CUDA, bf16, torch.compile, 2 midol steps
    gpu_suite.py section A --out DIR   # the eager table at batch 64 + the host-sync audit
    gpu_suite.py section B --out DIR   # compile / activation checkpointing / fused attention
    gpu_suite.py section C --out DIR   # what B leaves for a third call (optional)

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
import contextlib
import datetime
import gc
import importlib.abc
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16, vendor datasheet
MEASURED_PEAK = 790e12  # 8192^3 bf16 matmul on random data, this workplace's H200
FLOP_BATCH = 2  # FLOPs are counted at this batch and scaled linearly
MIN_TIMM = "1.0.9"


# ------------------------------------------------------------------ stdlib-only helpers
def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:4])


def read_wheel_list(path: Path) -> list[tuple[str, str, str | None]]:
    """``(name, version, min_version)`` per ``name==version  # min=X`` line of wheels.txt."""
    out = []
    for raw in path.read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: expected name==version, got {raw!r}")
        found = re.search(r"min=([0-9][0-9.]*)", comment)
        out.append((name.strip(), version.strip(), found.group(1) if found else None))
    return out


def missing_wheels(path: Path, everything: bool = False) -> list[str]:
    """Requirements (``name==version``) of the list that this interpreter lacks: not installed,
    or older than the line's ``min=`` (then the carried version replaces it); ``everything``:
    every line (the carried versions replace the machine's)."""
    from importlib import metadata

    missing = []
    for name, version, minimum in read_wheel_list(path):
        if everything:
            missing.append(f"{name}=={version}")
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}")
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            missing.append(f"{name}=={version}")
    return missing


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a kill never leaves half a file


def record_status(out: Path, key: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entry`` into ``out/status.json`` under ``key`` (``setup`` or ``sections``)."""
    path = out / "status.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("setup", {})
    data.setdefault("sections", {})
    result = out / f"gpu_{name}.json"
    if key == "sections" and name == "preflight" and result.exists():
        try:
            pre = json.loads(result.read_text())
            entry["checks"] = {c["name"]: "ok" if c["ok"] else c.get("error", "failed")
                               for c in pre.get("checks", [])}
            if pre.get("failed"):
                entry["failed_check"] = pre["failed"]
        except (OSError, ValueError, KeyError) as err:
            entry["checks"] = f"unreadable: {err}"
    elif key == "sections" and result.exists():
        try:
            rows = json.loads(result.read_text()).get("rows", [])
            entry["rows"] = {
                "total": len(rows),
                "ok": sum(r["status"] == "ok" for r in rows),
                "not_ok": {f"{r['row']} {r['label']}": r["status"]
                           for r in rows if r["status"] != "ok"},
            }
        except (OSError, ValueError, KeyError) as err:
            entry["rows"] = f"unreadable: {err}"
    data[key][name] = entry
    data["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    _write_json(path, data)
    return data


def _add_paths() -> None:
    """midol from the checkout (it is not installed on a GPU machine), and this folder."""
    for path in (str(ROOT), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)


# ------------------------------------------------------------------ forced failure (tests)
class _Blocker(importlib.abc.MetaPathFinder):
    """``MIDOL_BENCH_BREAK=mod1,mod2``: importing those modules fails, as on a machine that
    lacks them (the test of a broken preflight)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"No module named {fullname!r} (blocked by MIDOL_BENCH_BREAK)")


def _install_blocker() -> None:
    names = {n.strip() for n in os.environ.get("MIDOL_BENCH_BREAK", "").split(",") if n.strip()}
    if names:
        sys.meta_path.insert(0, _Blocker(names))


# ------------------------------------------------------------------ machine description
def nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = ("name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,"
             "temperature.gpu,memory.used,memory.total,utilization.gpu")
    try:
        done = subprocess.run([exe, f"--query-gpu={query}", "--format=csv"],
                              check=False, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"failed: {err}"
    return (done.stdout or done.stderr).strip()


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "timm", "lightning", "torchmetrics", "albumentations", "lightly",
                 "numpy", "triton", "opencv-python-headless"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_meta(device) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": _versions(),
        "command": os.environ.get("MIDOL_BENCH_COMMAND")
        or " ".join(["python3", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda, nvidia_smi=nvidia_smi(),
        )
    else:
        meta.update(device=f"CPU {platform.processor() or platform.machine()}",
                    cpu_threads=torch.get_num_threads())
    return meta


# ------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Row:
    """One table row: a step_impls case, plus timm's fused (SDPA) attention for Swin."""

    impl: str
    views: str
    compile: bool = False
    ckpt: bool = False
    fused_attn: bool = False  # TIMM_FUSED_ATTN=2 (Swin's attention is "experimental" in timm)
    audit: bool = False  # a host-sync audit instead of a timed row

    @property
    def label(self) -> str:
        if self.audit:
            return f"{self.impl} [sync audit]"
        extras = [x for x, on in (("compile", self.compile), ("ckpt", self.ckpt),
                                  ("fused-attn", self.fused_attn)) if on]
        return f"{self.impl} [{'+'.join(extras) or 'eager'}]"


def _r(impl: str, views: str = "dino", **kw: bool) -> Row:
    return Row(impl, views, **kw)


# Priority order within each section: what matters most first, the budget may cut the tail.
SECTIONS: dict[str, tuple[str, list[Row]]] = {
    "A": ("Eager step table (both view settings) and host-sync audit", [
        _r("midol"), _r("midol-dino"), _r("authors", "authors"), _r("lightly"),
        _r("midol", audit=True), _r("midol-dinoce"),
        _r("midol", "authors"), _r("midol-dino", "authors"), _r("midol-dinoce", "authors"),
        _r("lightly", "authors"),
        _r("midol-dino", audit=True), _r("midol-dinoce", audit=True),
    ]),
    "B": ("torch.compile, activation checkpointing and fused attention (DINO view setting)", [
        _r("midol-dino"), _r("midol-dino", fused_attn=True), _r("midol-dino", ckpt=True),
        _r("midol-dino", compile=True), _r("midol-dino", compile=True, ckpt=True),
        _r("midol"), _r("midol", compile=True), _r("midol-dino", compile=True, fused_attn=True),
    ]),
    # What B's budget may leave out, and the rest of the grid (a third call, or "A B C" when
    # one call may run longer).
    "C": ("The rest of the compile grid (DINO view setting)", [
        _r("midol-dino"), _r("midol"), _r("midol", compile=True),
        _r("midol-dino", compile=True, fused_attn=True), _r("midol", compile=True, ckpt=True),
        _r("midol-dinoce"), _r("midol-dinoce", compile=True),
        _r("midol", compile=True, fused_attn=True),
    ]),
}


class SectionTimeout(BaseException):
    """SIGTERM from run_gpu.sh's ``timeout``: mark the running row, write, leave."""


def _on_sigterm(signum, frame) -> None:
    raise SectionTimeout


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
        _add_paths()
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


def _estimate(row: Row, done: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """Expected seconds for a row: the slowest finished row of its kind, else a default."""
    kind = "audit" if row.audit else ("compile" if row.compile else "eager")
    seen = [d["wall_s"] for d in done if d.get("kind") == kind and d["status"] == "ok"]
    if seen:
        return max(seen)
    defaults = {"eager": args.est_eager_s, "compile": args.est_compile_s,
                "audit": args.est_eager_s}
    return defaults[kind]


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


def _record(section: str, index: int, row: Row, batch: int) -> dict[str, Any]:
    return {"section": section, "row": index, "label": row.label, "impl": row.impl,
            "views": row.views, "batch": batch, "compile": row.compile, "ckpt": row.ckpt,
            "fused_attn": row.fused_attn,
            "kind": "audit" if row.audit else ("compile" if row.compile else "eager")}


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
    if args.check_flop_scaling:
        meta["flop_scaling_check"] = flop_scaling_check(suite, plan[0])
    rows: list[dict[str, Any]] = []
    data = {"section": name, "meta": meta, "rows": rows, "finished": False}
    json_path, md_path = out_dir / f"gpu_{name}.json", out_dir / f"gpu_{name}.md"

    def save() -> None:
        data["elapsed_s"] = round(time.monotonic() - t0, 1)
        _write_json(json_path, data)
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
        rec = _record(name, index, row, batch)
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
        rows.append({**_record(name, index, row, batch), "status": "not run: section timeout"})
    if code == 0:
        data["finished"] = True
        if suite.device.type == "cuda":
            meta["nvidia_smi_after"] = nvidia_smi()
    save()
    print(md_path.read_text(), flush=True)
    return code


# ------------------------------------------------------------------ report
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


# ------------------------------------------------------------------ preflight
def run_preflight(args: argparse.Namespace) -> int:
    """Cheap checks in the order in which they would fail; stop at the first failure."""
    t_start = time.monotonic()
    checks: list[dict[str, Any]] = []
    report = {"checks": checks, "ok": False, "device": args.device, "micro": args.micro,
              "versions": None}
    path = args.out / "gpu_preflight.json"

    def check(name: str, fn, required: bool = True) -> Any:
        t0 = time.monotonic()
        entry: dict[str, Any] = {"name": name, "required": required}
        checks.append(entry)
        try:
            entry["detail"] = fn()
            entry["ok"] = True
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                raise
            entry["ok"] = False
            entry["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        entry["seconds"] = round(time.monotonic() - t0, 2)
        state = "ok" if entry["ok"] else ("FAILED" if required else "warning")
        print(f"preflight {name}: {state} {entry.get('detail', entry.get('error'))}", flush=True)
        _write_json(path, report)
        if required and not entry["ok"]:
            report["elapsed_s"] = round(time.monotonic() - t_start, 2)
            report["failed"] = name
            _write_json(path, report)
            raise SystemExit(1)
        return entry.get("detail")

    def imports() -> dict[str, Any]:
        # The carried packages first: a missing wheel fails in a second, before torch loads.
        import albumentations  # noqa: F401
        import lightning  # noqa: F401
        import timm
        import torch  # noqa: F401

        _add_paths()
        import bench_step  # noqa: F401 - midol.methods, losses, models, data.transforms
        import step_impls  # noqa: F401

        if _version_tuple(timm.__version__) < _version_tuple(MIN_TIMM):
            raise ImportError(f"timm {timm.__version__} < {MIN_TIMM} (carry timm's wheel)")
        report["versions"] = _versions()
        return report["versions"]

    def lightly() -> str:
        from lightly.loss import DINOLoss  # noqa: F401
        from lightly.models.modules import DINOProjectionHead  # noqa: F401

        return "lightly importable"

    check("imports", imports)
    check("lightly", lightly, required=False)
    import torch

    device = torch.device(args.device)

    def cuda() -> dict[str, Any]:
        if device.type != "cuda":
            return {"skipped": f"device {device}"}
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        a = torch.randn(512, 512, device=device)
        err = ((a @ a).cpu().double() - a.cpu().double() @ a.cpu().double()).norm()
        rel = float(err / (a.cpu().double() @ a.cpu().double()).norm())
        if not rel < 1e-2:
            raise RuntimeError(f"float32 matmul on the GPU off by {rel:.2e}")
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "fp32_matmul_rel_err": rel, "nvidia_smi": nvidia_smi()}

    def bf16() -> dict[str, Any]:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("torch.cuda.is_bf16_supported() is False")
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            c = a.to(device) @ b.to(device)
        if c.dtype != torch.bfloat16:
            raise RuntimeError(f"autocast matmul gave {c.dtype}, not bfloat16")
        ref = a.double() @ b.double()
        rel = float((c.double().cpu() - ref).norm() / ref.norm())
        if not rel < 2e-2:
            raise RuntimeError(f"bf16 autocast matmul off by {rel:.2e}")
        return {"rel_err_vs_float64": rel}

    def compiled() -> dict[str, Any]:
        backend = args.compile_backend
        w = torch.randn(64, 64, device=device)

        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x @ w) * 2 + x.sin()

        x = torch.randn(32, 64, device=device)
        fast = torch.compile(f, backend=backend, dynamic=False)
        t0 = time.monotonic()
        y = fast(x)
        ref = f(x)
        rel = float((y - ref).norm() / ref.norm())
        if not rel < 1e-3:
            raise RuntimeError(f"torch.compile ({backend}) output off by {rel:.2e}")
        torch._dynamo.reset()
        return {"backend": backend, "rel_err": rel, "compile_s": round(time.monotonic() - t0, 2)}

    def midol_step() -> dict[str, Any]:
        import lightning as L
        import step_impls

        losses: list[float] = []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        preset = step_impls.PRESETS["micro"]
        case = step_impls.Case("midol", "dino", 2)
        batches = step_impls.make_batches(preset, "dino", 2, device)
        t0 = time.monotonic()
        step_impls.run_midol(case, preset, batches, 2, lambda i: None, device,
                             callbacks=[Losses()])
        if len(losses) != 2 or not all(math.isfinite(v) for v in losses):
            raise RuntimeError(f"2 finite losses expected, got {losses}")
        return {"losses": losses, "seconds": round(time.monotonic() - t0, 2),
                "preset": "micro", "precision": "bf16-mixed" if device.type == "cuda" else "32"}

    check("cuda", cuda)
    check("bf16", bf16)
    check("compile", compiled)
    check("midol_step", midol_step)
    report["ok"] = True
    report["elapsed_s"] = round(time.monotonic() - t_start, 2)
    _write_json(path, report)
    print(f"preflight ok in {report['elapsed_s']} s", flush=True)
    return 0


# ------------------------------------------------------------------ command line
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
    _install_blocker()
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
