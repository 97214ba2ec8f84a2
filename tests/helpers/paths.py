"""Where the test data lives: the bundled sample corpus and the optional shared data folder."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO_ROOT / "sample_data"
# The project's shared datasets live beside the repository, not inside it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
