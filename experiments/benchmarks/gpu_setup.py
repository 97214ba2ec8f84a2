"""What ``run_gpu.sh`` needs of ``gpu_suite.py`` before torch is importable, and the files and
paths every subcommand shares: the carried wheels this interpreter lacks (``wheels.txt``), the
merge of one step's outcome into ``$OUT/status.json``, the atomic JSON write, the checkout on
``sys.path`` and the forced import failures of the tests (``MIDOL_BENCH_BREAK``). Standard
library only: ``missing-wheels`` and ``status`` run before the carried wheels are installed.
"""

from __future__ import annotations

import datetime
import importlib.abc
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# ------------------------------------------------------------------ carried wheels
def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:4])


def read_wheel_list(path: Path) -> list[tuple[str, str, str | None]]:
    """``(name, version, min_version)`` per ``name==version  # min=X`` line of wheels.txt."""
    out = []
    for raw in path.read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: expected name==version, got {raw!r}")
        found = re.search(r"min=([0-9][0-9.]*)", comment)
        out.append((name.strip(), version.strip(), found.group(1) if found else None))
    return out


def missing_wheels(path: Path, everything: bool = False) -> list[str]:
    """Requirements (``name==version``) of the list that this interpreter lacks: not installed,
    or older than the line's ``min=`` (then the carried version replaces it); ``everything``:
    every line (the carried versions replace the machine's)."""
    from importlib import metadata

    missing = []
    for name, version, minimum in read_wheel_list(path):
        if everything:
            missing.append(f"{name}=={version}")
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}")
            continue
        if minimum and version_tuple(have) < version_tuple(minimum):
            missing.append(f"{name}=={version}")
    return missing


# ------------------------------------------------------------------ status.json
def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a kill never leaves half a file


def record_status(out: Path, key: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entry`` into ``out/status.json`` under ``key`` (``setup`` or ``sections``)."""
    path = out / "status.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("setup", {})
    data.setdefault("sections", {})
    result = out / f"gpu_{name}.json"
    if key == "sections" and name == "preflight" and result.exists():
        try:
            pre = json.loads(result.read_text())
            entry["checks"] = {c["name"]: "ok" if c["ok"] else c.get("error", "failed")
                               for c in pre.get("checks", [])}
            if pre.get("failed"):
                entry["failed_check"] = pre["failed"]
        except (OSError, ValueError, KeyError) as err:
            entry["checks"] = f"unreadable: {err}"
    elif key == "sections" and result.exists():
        try:
            rows = json.loads(result.read_text()).get("rows", [])
            entry["rows"] = {
                "total": len(rows),
                "ok": sum(r["status"] == "ok" for r in rows),
                "not_ok": {f"{r['row']} {r['label']}": r["status"]
                           for r in rows if r["status"] != "ok"},
            }
        except (OSError, ValueError, KeyError) as err:
            entry["rows"] = f"unreadable: {err}"
    data[key][name] = entry
    data["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(path, data)
    return data


def add_paths() -> None:
    """midol from the checkout (it is not installed on a GPU machine), and this folder."""
    for path in (str(ROOT), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)


# ------------------------------------------------------------------ forced failure (tests)
class _Blocker(importlib.abc.MetaPathFinder):
    """``MIDOL_BENCH_BREAK=mod1,mod2``: importing those modules fails, as on a machine that
    lacks them (the test of a broken preflight)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"No module named {fullname!r} (blocked by MIDOL_BENCH_BREAK)")


def install_blocker() -> None:
    names = {n.strip() for n in os.environ.get("MIDOL_BENCH_BREAK", "").split(",") if n.strip()}
    if names:
        sys.meta_path.insert(0, _Blocker(names))
