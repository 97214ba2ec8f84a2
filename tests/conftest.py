"""Shared fixtures: the bundled sample corpus and the optional shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"
# The project's shared datasets live beside the repository, not inside it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The bundled sample corpus (``sample_data/`` in the repository)."""
    assert SAMPLE_DATA.is_dir(), f"bundled sample corpus missing: {SAMPLE_DATA}"
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data folder not found at {SHARED_DATA} (needs the project's real datasets)"
        )
    return SHARED_DATA
