"""Shared fixtures: the bundled sample corpus and the optional shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.paths import SAMPLE_DATA, SHARED_DATA  # test modules import these from there


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
