"""Test modules share code through ``tests/helpers/`` and fixtures through ``conftest.py``,
never by importing another test module or a ``conftest.py``: importing a test module runs its
module-level code and re-collects its fixtures, and moving or deleting one test would break
another. Every ``.py`` under ``tests/`` and ``experiments/`` is parsed (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("tests", "experiments")


def _is_test_module(name: str) -> bool:
    """``tests.<...>.test_*`` / ``tests.<...>.conftest`` (and the same under experiments)."""
    parts = name.split(".")
    return parts[0] in ROOTS and any(p.startswith("test_") or p == "conftest" for p in parts[1:])


def _imported(node: ast.Import | ast.ImportFrom, package: list[str]) -> list[str]:
    """The dotted modules an import statement may load; relative ones resolved from ``package``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    # `from pkg import name` loads pkg.name when name is a submodule
    return [module, *(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")]


def imports_of_test_modules(path: Path, root: Path) -> list[str]:
    """``file:line: imports <module>`` for each import of a test module or conftest in ``path``."""
    package = list(path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bad = next((m for m in _imported(node, package) if _is_test_module(m)), None)
            if bad is not None:
                found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: imports {bad}"))
    return [line for _, line in sorted(found)]


def layout_violations(root: Path) -> list[str]:
    files = sorted(p for top in ROOTS if (root / top).is_dir() for p in (root / top).rglob("*.py")
                   if "__pycache__" not in p.parts)
    return [line for path in files for line in imports_of_test_modules(path, root)]


def test_no_test_module_imports_another_test_module_or_a_conftest():
    bad = layout_violations(REPO)
    assert not bad, ("move what is shared into tests/helpers/ (fixtures: the package's "
                     "conftest.py):\n" + "\n".join(bad))


def test_the_checker_finds_planted_imports(tmp_path):
    pkg = tmp_path / "tests" / "tasks"
    pkg.mkdir(parents=True)
    (tmp_path / "tests" / "helpers").mkdir()
    (tmp_path / "tests" / "helpers" / "task_data.py").write_text("import csv\n")
    (tmp_path / "tests" / "conftest.py").write_text("import pytest\n")
    (pkg / "conftest.py").write_text("import pytest\n")
    (pkg / "test_good.py").write_text(
        "import pytest\nimport tests.helpers.task_data\nfrom tests.helpers import task_data\n"
        "from tests.helpers.task_data import write_csv\nfrom . import helpers_local\n"
        "from torch.testing import assert_close\n\n\ndef test_a(sample_data):\n    pass\n")
    (pkg / "test_bad.py").write_text(
        "from tests.data.test_task_data import write_csv\n"  # 1
        "import tests.tools.test_export\n"  # 2
        "from tests.conftest import SHARED_DATA\n"  # 3
        "from tests.evaluation import test_metrics\n"  # 4
        "from .test_good import test_a\n"  # 5
        "from . import conftest\n"  # 6
        "\n\ndef test_b():\n"
        "    from ..losses.test_sinkhorn import authors_reference\n"  # 10
        "    from experiments.benchmarks.tests.test_bench import X\n")  # 11
    bench = tmp_path / "experiments" / "benchmarks" / "tests"
    bench.mkdir(parents=True)
    (bench / "test_bench.py").write_text("from tests.helpers.tiny import TINY_SWIN\n"
                                         "from tests.test_layers import x\n")
    assert layout_violations(tmp_path) == [
        "experiments/benchmarks/tests/test_bench.py:2: imports tests.test_layers",
        "tests/tasks/test_bad.py:1: imports tests.data.test_task_data",
        "tests/tasks/test_bad.py:2: imports tests.tools.test_export",
        "tests/tasks/test_bad.py:3: imports tests.conftest",
        "tests/tasks/test_bad.py:4: imports tests.evaluation.test_metrics",
        "tests/tasks/test_bad.py:5: imports tests.tasks.test_good",
        "tests/tasks/test_bad.py:6: imports tests.tasks.conftest",
        "tests/tasks/test_bad.py:10: imports tests.losses.test_sinkhorn",
        "tests/tasks/test_bad.py:11: imports experiments.benchmarks.tests.test_bench",
    ]
