"""What the library measurements share: the shared data folder, timing, the machine's load."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("MIDOL_SHARED_DATA", REPO.parent / "shared" / "data"))


def need_shared_data() -> Path:
    """The shared data folder, or exit with one line naming it (the sets are not in the repo)."""
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"{SHARED_DATA} is missing: the measurements read the shared real images")
    return SHARED_DATA


def best_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Best-of-``repeats`` wall time in seconds (the minimum: a shared machine only adds time)
    and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"
