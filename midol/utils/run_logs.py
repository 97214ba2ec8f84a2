"""The log folders of a run, recorded in its checkpoints, so that tools read that run's own
``metrics.csv`` (``midol analyze``'s loss curves) and not whichever file is newest in the folder
(another run started there with ``--overwrite true``, or a rerun).

A checkpoint holds, under the top-level key :data:`LOG_DIRS_KEY`::

    {"dirs": ["/abs/run/logs/version_0", "/abs/run/logs/version_1"], "root": "/abs/run"}

``dirs``: the CSVLogger ``log_dir`` of every fit that trained these weights, oldest first (a
resumed fit logs into a new version folder, so a resume adds its folder to those of the
checkpoint it resumed); ``root``: the trainer's ``default_root_dir``, with which a run folder
that was moved or copied is still found.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LOG_DIRS_KEY = "midol_log_dirs"


def csv_log_dirs(trainer: Any) -> list[str]:
    """Absolute ``log_dir`` of every CSVLogger of ``trainer`` (loggers without a
    ``metrics.csv``, such as W&B, are left out)."""
    from lightning.pytorch.loggers import CSVLogger

    dirs = []
    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, CSVLogger):
            dirs.append(os.path.abspath(str(logger.log_dir)))
    return dirs


def record_log_dirs(checkpoint: dict[str, Any], trainer: Any, previous: Iterable[str] = ()) -> None:
    """Write :data:`LOG_DIRS_KEY` into ``checkpoint``: ``previous`` (those of the checkpoint
    this fit resumed) followed by this fit's CSVLogger folders."""
    dirs: list[str] = []
    for folder in [*previous, *csv_log_dirs(trainer)]:
        if folder not in dirs:
            dirs.append(folder)
    root = getattr(trainer, "default_root_dir", None)
    checkpoint[LOG_DIRS_KEY] = {"dirs": dirs, "root": os.path.abspath(root) if root else None}


def recorded_log_dirs(checkpoint: dict[str, Any]) -> list[str]:
    """The ``dirs`` a checkpoint records (empty when it records none)."""
    record = checkpoint.get(LOG_DIRS_KEY)
    return [str(d) for d in record.get("dirs") or []] if isinstance(record, dict) else []


def run_folder(checkpoint_path: str | Path) -> Path:
    """``<run>`` of ``<run>/checkpoints/x.ckpt`` (else the checkpoint's own folder)."""
    folder = Path(checkpoint_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def newest_metrics(checkpoint_path: str | Path) -> Path | None:
    """The newest ``metrics.csv`` under the checkpoint's run folder, or None (the guess for a
    checkpoint that records no log folders)."""
    found = sorted(run_folder(checkpoint_path).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_metrics_files(checkpoint_path: str | Path, checkpoint: dict[str, Any]) -> list[Path]:
    """The ``metrics.csv`` files of the run that wrote ``checkpoint`` (read from
    ``checkpoint_path``), oldest first.

    From the folders the checkpoint records (a moved run folder is looked up under the
    checkpoint's own run folder); for a checkpoint that records none (written by midol before
    this key existed), or whose folders are all gone, the newest ``metrics.csv`` under its run
    folder, with a warning that it may be another run's. Empty when there is none at all."""
    record = checkpoint.get(LOG_DIRS_KEY)
    if isinstance(record, dict):
        root = record.get("root")
        found: list[Path] = []
        missing: list[str] = []
        for folder in recorded_log_dirs(checkpoint):
            candidates = [Path(folder) / "metrics.csv"]
            if root:
                relative = os.path.relpath(folder, root)
                if not relative.startswith(os.pardir):
                    candidates.append(run_folder(checkpoint_path) / relative / "metrics.csv")
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                missing.append(folder)
            else:
                found.append(hit)
        if found:
            if missing:
                warnings.warn(f"{checkpoint_path}: log folder(s) {', '.join(missing)} of its run "
                              "are gone; the loss curves show the other part of the run",
                              stacklevel=2)
            return found
        if not record.get("dirs"):
            return []  # the run had no CSVLogger
        why = f"its run's log folders ({', '.join(missing)}) are gone"
    else:
        why = "it does not record its run's log folders (written by an older midol)"
    newest = newest_metrics(checkpoint_path)
    if newest is not None:
        warnings.warn(f"{checkpoint_path}: {why}; reading the newest metrics.csv under its run "
                      f"folder, {newest}, which may be another run's (pass --metrics to choose)",
                      stacklevel=2)
        return [newest]
    return []
