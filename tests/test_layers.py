"""The layers of docs/architecture.md, kept: no module imports from a layer above its own, and
no two packages import each other (imports inside functions and under TYPE_CHECKING count)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "midol"

# lowest first; the names are midol's sub-packages and top-level modules ("midol" is its __init__)
LAYERS: list[set[str]] = [
    {"midol", "legacy", "errors", "console", "utils", "config_compose", "config_errors", "commands"},
    {"io"},
    {"losses", "optim"},
    {"models"},
    {"data"},
    {"methods"},
    {"tasks"},
    {"fusion"},
    {"analysis"},
    {"evaluation"},
    {"callbacks"},
    {"run_guard", "loggers"},
    {"lightning_cli"},
    {"tools"},
    {"cli", "__main__"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: ``midol.data.readers`` -> ``data``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "midol"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def midol_imports(path: Path) -> list[tuple[str, int]]:
    """Every ``midol`` module ``path`` imports, anywhere in the file, with its line."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: len(mod.split(".")) - node.level + int(is_pkg)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
    return [(t, line) for t, line in found if t == "midol" or t.startswith("midol.")]


def edges() -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path))
        for target, line in midol_imports(path):
            dst = unit_of(target)
            if dst != src:
                out[(src, dst)].append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return out


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(LEVEL) == set(), "add the new package or module to LAYERS and docs/architecture.md"


def test_no_import_runs_up_the_layers() -> None:
    upward = [f"{src} -> {dst}: {', '.join(where)}" for (src, dst), where in edges().items()
              if LEVEL[dst] > LEVEL[src]]
    assert upward == []


def test_no_two_packages_import_each_other() -> None:
    e = edges()
    cycles = sorted({tuple(sorted(pair)) for pair in e if (pair[1], pair[0]) in e})
    assert cycles == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = PACKAGE / "data" / "readers.py"
    lines = [t for t, _ in midol_imports(f)]
    assert "midol.data.image_io" in lines or any(t.startswith("midol.data") for t in lines)
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from midol.tools import cmd_eval\n")
    tree = ast.parse(fake.read_text())
    inner = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert inner and inner[0].module == "midol.tools"


def test_the_written_order_matches_docs() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for layer in LAYERS:
        for unit in layer - {"midol", "__main__"}:
            assert f"`{unit}" in doc, f"docs/architecture.md does not place {unit}"


@pytest.mark.parametrize("old,new", [
    ("midol.methods.MedMIX", "midol.fusion.module.MedMIX"),
    ("midol.methods.medmix.MedMIX", "midol.fusion.module.MedMIX"),
    ("midol.methods.FinetuneModule", "midol.tasks.FinetuneModule"),
    ("midol.methods.MIDoL", "midol.methods.MIDoL"),
])
def test_moved_class_paths_resolve(old: str, new: str) -> None:
    from midol.legacy import resolve_class_path

    assert resolve_class_path(old) == new


def test_old_import_path_warns_and_gives_the_same_object() -> None:
    import midol.io.export as old
    from midol.methods.export import export_method

    with pytest.warns(DeprecationWarning, match="0.4"):
        assert old.export_method is export_method
