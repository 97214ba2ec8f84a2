"""mypy covers the whole package (lightly's way): ``files = ["midol"]`` and a list of modules
not yet clean that may only shrink. Lower ``MAX_UNCHECKED`` when you clean one."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
MAX_UNCHECKED = 21  # 2026-12-07: 21 modules, 83 errors (was 321 errors in 38 modules)


def mypy_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]


def test_mypy_checks_the_whole_package() -> None:
    assert mypy_config()["files"] == ["midol"]


def test_the_unchecked_list_only_shrinks_and_names_real_modules() -> None:
    unchecked = [m for o in mypy_config().get("overrides", []) if o.get("ignore_errors")
                 for m in o["module"]]
    assert len(unchecked) <= MAX_UNCHECKED
    missing = [m for m in unchecked if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert missing == []
