"""A full disk (issue 26 item 13): a checkpoint or a feature-cache write that fails for lack of
space stops with one line naming the file and the free space, exit 3, and the previous file is
intact. Before, torch's "file write failed" RuntimeError was reported as a bug (exit 1)."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from midol.data.feature_cache import FeatureCache
from midol.errors import EXIT_INPUT, OutputFileError, exit_code, format_error
from midol.io.checkpoint_io import AtomicCheckpointIO
from tests.helpers.paths import SAMPLE_DATA

Usage = namedtuple("Usage", "total used free")


def full_disk(monkeypatch: pytest.MonkeyPatch, free: int = 3 * 2**20) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - free, free))


def test_full_disk_during_a_checkpoint_save_is_one_line_exit_3_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    before = target.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    full_disk(monkeypatch)
    with pytest.raises(OutputFileError) as err:
        io.save_checkpoint({"step": 2}, target)
    line = format_error(err.value)
    assert exit_code(err.value) == EXIT_INPUT and "\n" not in line
    assert f"{target}: the disk is full (3 MiB free in {target.parent})" in line
    assert "bug" not in line
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_other_write_failures_are_not_called_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="some other failure"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")


def test_full_disk_in_the_feature_cache_is_one_line_exit_3(tmp_path: Path, monkeypatch) -> None:
    files = sorted(str(p) for p in (SAMPLE_DATA / "oct").rglob("*.png"))[:2]
    assert len(files) == 2

    def failing_np_save(fh, arr, allow_pickle=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", failing_np_save)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(OutputFileError, match=r"features.npy: the disk is full") as err:
        cache.features(lambda x: torch.zeros(len(x), 4), "enc", files,
                       lambda a: torch.zeros(3, 8, 8, dtype=torch.uint8), "t")
    assert exit_code(err.value) == EXIT_INPUT


def test_temporaries_of_killed_writers_are_cleaned_but_a_live_one_stays(tmp_path: Path) -> None:
    """Issue 26 item 16: large hidden temporary files of killed writers were never cleaned."""
    import os
    import time

    from midol.io.atomic import atomic_write_text

    target = tmp_path / "features.npy"
    stale, live = tmp_path / ".features.npy.abc123.tmp", tmp_path / ".features.npy.def456.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    atomic_write_text(target, "new")
    assert not stale.exists() and live.exists() and target.read_text() == "new"
