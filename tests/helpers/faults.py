"""Helpers for the fault-injection tests: a tiny `midol fit` config and real subprocess runs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import yaml

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]


class PauseAtStep(L.Callback):
    """Test fixture: once ``global_step`` reaches ``step``, write ``marker`` and sleep (until a
    SIGTERM arrives or ``seconds`` pass), so a test can signal the process at a known point."""

    def __init__(self, step: int, marker: str, seconds: float = 300.0) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(f"{trainer.global_step}\n")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.02)


def tiny_config(
    out: Path,
    *,
    max_epochs: int = 3,
    every_n_train_steps: int = 3,
    num_workers: int = 2,
    pause: tuple[int, Path] | None = None,
    deterministic: bool = True,
) -> Path:
    """A demo-like config (tiny Swin with drop-path, router noise, DINO-CE with its centre,
    teacher-temperature warm-up) on real sample images; 4 steps per epoch."""
    callbacks: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "save_top_k": 0,
                       "enable_version_counter": False}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "save_top_k": 0,
                       "every_n_train_steps": every_n_train_steps,
                       "enable_version_counter": False}},
        {"class_path": "midol.callbacks.PreemptionCheckpoint"},
        {"class_path": "midol.callbacks.ExportBackbone", "init_args": {"dirpath": str(out)}},
    ]
    if pause is not None:
        callbacks.append({"class_path": "tests.helpers.faults.PauseAtStep",
                          "init_args": {"step": pause[0], "marker": str(pause[1])}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "max_epochs": max_epochs, "log_every_n_steps": 1, "gradient_clip_val": 3.0,
            "default_root_dir": str(out), "enable_progress_bar": False,
            "enable_model_summary": False, "deterministic": deterministic,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out), "name": "logs"}},
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "midol.methods.PretrainModule",
            "init_args": {
                "backbone": "swin_tiny_patch4_window7_224",
                "backbone_kwargs": {"img_size": 32, "embed_dim": 16, "depths": [1, 1],
                                    "num_heads": [1, 2], "window_size": 4,
                                    "drop_path_rate": 0.2},
                "num_experts": 3, "expert_hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64,
                "router_noise": 0.1, "cst_loss": "dino_ce", "base_lr": 5.0e-3,
                "warmup_epochs": 1, "warmup_teacher_temp": 0.02,
                "warmup_teacher_temp_epochs": 2, "freeze_last_layer_epochs": 1,
            },
        },
        "data": {
            "class_path": "midol.data.PretrainDataModule",
            "init_args": {
                "batch_size": 8, "num_workers": num_workers, "samples_per_epoch": 32,
                "transform": {"class_path": "midol.data.MultiCropTransform",
                              "init_args": {"global_size": 32, "local_size": 16,
                                            "num_global": 2, "num_local": 2}},
                "sources": [{"path": str(REPO / "sample_data/xray"), "modality": "xray"},
                            {"path": str(REPO / "sample_data/pathology"),
                             "modality": "pathology"}],
            },
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def midol_env() -> dict[str, str]:
    """One CPU thread (fast and deterministic on a shared machine); the repository (tests.helpers) importable."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})
    return env


def start_fit(config: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """``midol fit --config CONFIG`` in a new process, output to ``log``."""
    handle = open(log, "wb")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-m", "midol", "fit", "--config", str(config), *extra],
        cwd=REPO, env=midol_env(), stdout=handle, stderr=subprocess.STDOUT,
    )


def wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        raise AssertionError(f"run did not finish:\n{log.read_text()[-3000:]}") from None


def step_metrics(out: Path, version: int) -> dict[int, dict[str, float]]:
    """CSVLogger rows of ``out/logs/version_N`` merged per step: {step: {metric: value}}."""
    rows: dict[int, dict[str, float]] = {}
    with open(out / "logs" / f"version_{version}" / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            merged = rows.setdefault(int(row["step"]), {})
            merged.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def flip_a_bit(path: Path) -> str:
    """Flip one bit in the middle of the largest member of a torch zip checkpoint (what a bad
    disk or copy does); the member's name."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))
    return info.filename
