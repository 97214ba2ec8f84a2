"""A tiny pre-training run (real sample images, a few steps) shared by the analysis tests: its
Lightning checkpoint and CSVLogger metrics are what ``midol analyze``/``midol route`` read."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from midol.data import DataSource
from tests.helpers.tiny import SAMPLE_DATA, tiny_datamodule, tiny_module

_RUN: dict[str, Path] = {}
STEPS = 4


def sample_sources() -> list[DataSource]:
    """All four modalities of the bundled sample (117 image files + 200 npz rows)."""
    return [
        DataSource(str(SAMPLE_DATA / "xray"), "xray"),
        DataSource(str(SAMPLE_DATA / "pathology"), "pathology"),
        DataSource(str(SAMPLE_DATA / "oct"), "oct"),
        DataSource(str(SAMPLE_DATA / "fundus_retinamnist.npz"), "fundus"),
    ]


def tiny_run(root: Path) -> Path:
    """Run folder with ``checkpoints/last.ckpt`` and ``logs/version_0/metrics.csv``; made once
    per test session (a 4-step fit of the tiny Swin, ~5 s on 2 CPU cores)."""
    if "dir" in _RUN:
        return _RUN["dir"]
    L.seed_everything(0)
    run = root / "tiny_run"
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, log_every_n_steps=1,
        default_root_dir=str(run), logger=CSVLogger(str(run), name="logs"),
        callbacks=[ModelCheckpoint(dirpath=str(run / "checkpoints"), save_last=True, save_top_k=0)],
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(tiny_module(num_experts=3), tiny_datamodule(sources=sample_sources()))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    _RUN["dir"] = run
    return run
