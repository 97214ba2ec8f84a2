"""The preflight (``gpu_suite.py preflight``): seconds of checks in the order in which they
would fail (imports, lightly, CUDA, bf16, torch.compile, two steps of the real midol step on the
micro Swin), each written to ``gpu_preflight.json`` at once; the first required failure stops it.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from experiments.benchmarks.gpu_machine import nvidia_smi, package_versions
from experiments.benchmarks.gpu_setup import add_paths, version_tuple, write_json

MIN_TIMM = "1.0.9"


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
        write_json(path, report)
        if required and not entry["ok"]:
            report["elapsed_s"] = round(time.monotonic() - t_start, 2)
            report["failed"] = name
            write_json(path, report)
            raise SystemExit(1)
        return entry.get("detail")

    def imports() -> dict[str, Any]:
        # The carried packages first: a missing wheel fails in a second, before torch loads.
        import albumentations  # noqa: F401
        import lightning  # noqa: F401
        import timm
        import torch  # noqa: F401

        add_paths()
        import bench_step  # noqa: F401 - midol.methods, losses, models, data.transforms
        import step_impls  # noqa: F401

        if version_tuple(timm.__version__) < version_tuple(MIN_TIMM):
            raise ImportError(f"timm {timm.__version__} < {MIN_TIMM} (carry timm's wheel)")
        report["versions"] = package_versions()
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
    write_json(path, report)
    print(f"preflight ok in {report['elapsed_s']} s", flush=True)
    return 0
