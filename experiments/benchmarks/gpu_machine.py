"""The description of the machine that every result file carries: date, host, package
versions, the command, load average and, on a GPU, the device's properties and ``nvidia-smi``'s
clocks, power and memory. torch is imported only inside ``machine_meta``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from experiments.benchmarks.gpu_setup import ROOT


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


def package_versions() -> dict[str, str | None]:
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
        "versions": package_versions(),
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
