"""`midol --version`, `midol --help` and cheap tools' `--help` answer without importing torch or
Lightning (issue 27, item 9: they took 10-14 s, the import of lightning)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

import midol

REPO = Path(__file__).resolve().parents[2]
# the console script of the environment running the tests (.venv/bin/midol)
MIDOL = Path(sys.executable).with_name("midol")
HEAVY = ("torch", "lightning", "timm", "numpy")


def imported_after(code: str) -> dict[str, bool]:
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(str(m in sys.modules) for m in {HEAVY!r}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()[-1]
    return dict(zip(HEAVY, (v == "True" for v in out.split())))


@pytest.mark.skipif(not MIDOL.is_file(), reason="the midol console script is not installed")
def test_version_answers_in_well_under_three_seconds():
    start = time.perf_counter()
    done = subprocess.run([str(MIDOL), "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert elapsed < 3.0, f"midol --version took {elapsed:.1f} s"
    out = done.stdout.strip()
    # the same versions as the installed packages (torch with its build suffix, e.g. +cu130)
    torch_version = importlib.metadata.version("torch")
    assert out.startswith(f"midol {midol.__version__} (torch {torch_version}")
    assert out.endswith(f", lightning {importlib.metadata.version('lightning')}, "
                        f"timm {importlib.metadata.version('timm')})")


def test_version_and_top_level_help_import_no_heavy_library():
    assert not any(imported_after("import midol.cli").values())
    assert not any(imported_after(
        "import contextlib, io\nfrom midol.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--version']) == 0 and main(['--help']) == 0").values())


@pytest.mark.parametrize("tool", ["export", "shard"])
def test_cheap_tools_help_imports_no_heavy_library(tool):
    code = ("import contextlib, io\nfrom midol.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n"
            f"        main([{tool!r}, '--help'])\n"
            "    except SystemExit as err:\n"
            "        assert err.code == 0\n"
            f"assert buf.getvalue().startswith('usage: midol {tool}')")
    assert imported_after(code) == dict.fromkeys(HEAVY, False)


def test_top_level_help_lists_subcommands_and_tools(capsys):
    from midol.cli import TOOLS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: midol")
    for name in ("fit", "validate", "test", *TOOLS):
        assert name in out


def test_lightning_names_stay_importable_from_midol_cli():
    from midol import cli, lightning_cli

    assert cli.MidolCLI is lightning_cli.MidolCLI
    assert cli.fill_output_dirs is lightning_cli.fill_output_dirs
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018
