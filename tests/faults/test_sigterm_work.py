"""SIGTERM outside a training loop (issue 26 item 6): during the feature pass it is handled like
Ctrl-C, the rows encoded so far are kept, and midol exits 143 (before, the process died at once
and kept nothing)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from midol.data.feature_cache import FeatureCache
from midol.errors import EXIT_TERMINATED, Terminated, format_error, run_reporting
from tests.helpers.paths import SAMPLE_DATA


def test_sigterm_during_the_feature_pass_keeps_the_rows_done_and_exits_143(tmp_path: Path) -> None:
    files = sorted(str(p) for p in (SAMPLE_DATA / "oct").rglob("*.png"))[:6]
    assert len(files) == 6
    calls: list[int] = []
    stop_at = [2]

    def encoder(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == stop_at[0]:  # the scheduler stops the job during the second batch
            stop_at[0] = -1
            os.kill(os.getpid(), signal.SIGTERM)
        return images.float().mean(dim=(2, 3))

    cache = FeatureCache(tmp_path)
    run = lambda: cache.features(encoder, "enc", files, lambda a: torch.zeros(3, 8, 8, dtype=torch.uint8) + 1,  # noqa: E731
                                 "t", batch_size=2)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        run()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only the feature pass's
    calls.clear()
    again = cache.features(encoder, "enc", files, lambda a: torch.zeros(3, 8, 8, dtype=torch.uint8) + 1,
                           "t", batch_size=2)
    assert again.reused == 2 and again.computed == 4  # the batch finished before SIGTERM is kept
    assert sum(calls) == 4

    lines: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    def killed() -> None:
        raise Terminated("terminated (SIGTERM)")

    assert run_reporting(killed, stream=Stream()) == EXIT_TERMINATED == 143
    assert "".join(lines).strip() == format_error(Terminated()) == (
        "midol: terminated (SIGTERM); the work finished so far is kept")
