"""What every benchmark here shares: the machine's description, robust statistics, tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), by device-name fragment.
# A measured large-matmul rate is reported beside them (see ``matmul_peak_tflops``).
DATASHEET_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
}


def datasheet_tflops(device_name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def uptime_load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: timings need them)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), affinity {affinity} of {os.cpu_count()} cores"
    )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str, device: torch.device, argv: Sequence[str]) -> list[str]:
    """Markdown lines: title, date, device, software, command and load."""
    import lightning
    import timm

    return [
        f"# {title}",
        "",
        f"* date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"* device: {device_description(device)}",
        f"* software: python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, timm {timm.__version__}; midol {git_revision()}",
        f"* command: `{' '.join(['python'] + list(argv))}`",
        f"* load average before (1/5/15 min): {uptime_load()}",
        "",
    ]


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 1) -> str:
    """``median (min-max)``; a single value alone."""
    med, lo, hi = median_spread(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def publish(lines: Sequence[str], out: str | os.PathLike[str] | None) -> str:
    """The report as text: printed, and written to ``out`` (folders made) when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """Rate of a large square matrix product on random data (median of ``reps`` runs)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    (a @ b).sum()
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e12


def python_command() -> list[str]:
    return [os.path.relpath(sys.argv[0])] + sys.argv[1:]
