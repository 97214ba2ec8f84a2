"""The code's citations can be followed from a clone: every formula's home is a page under
``docs/papers/`` (docs/papers/README.md), never notes outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ROOT / "docs" / "papers"
PAGES = ("README.md", "m-idol.md", "dex.md", "medmix.md")
# Notes that live outside the repository (``../shared/data`` is a data path, not a citation).
OUTSIDE = ("shared/docs", "shared/papers", "spec §")
PAGE_REF = re.compile(r"docs/papers/([\w.-]+\.md)")
# "docs/papers/dex.md, 'Director update (group EMA)'" (the title may wrap onto the next line)
SECTION_REF = re.compile(r"docs/papers/([\w.-]+\.md)`{0,2},\s*(['\"])(.+?)\2", re.DOTALL)


def _sources() -> list[Path]:
    return sorted((ROOT / "midol").rglob("*.py"))


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_no_citation_outside_the_repository() -> None:
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in _sources()
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if any(s in line for s in OUTSIDE)]
    assert not found, "cite docs/papers/ instead:\n" + "\n".join(found)


@pytest.mark.parametrize("name", PAGES)
def test_paper_page_exists(name: str) -> None:
    page = PAPERS / name
    assert page.is_file(), f"{page} is missing"
    assert page.read_text(encoding="utf-8").strip(), f"{page} is empty"


def test_cited_pages_and_sections_exist() -> None:
    cited: dict[str, set[str]] = {}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for name in PAGE_REF.findall(text):
            cited.setdefault(name, set()).add(str(path.relative_to(ROOT)))
        for name, _, title in SECTION_REF.findall(text):
            page = PAPERS / name
            if page.is_file():
                assert _squash(title) in _squash(page.read_text(encoding="utf-8")), (
                    f"{path.relative_to(ROOT)} cites section {title!r} of "
                    f"{page.relative_to(ROOT)}, which has no such title")
    assert cited, "no docs/papers/ citation found under midol/: the pattern is stale"
    missing = {name: sorted(where) for name, where in cited.items()
               if not (PAPERS / name).is_file()}
    assert not missing, f"cited pages that do not exist: {missing}"
