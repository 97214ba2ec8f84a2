"""Preset composition: a YAML preset may name ``base:`` presets it starts from.

    # configs/pretrain/midol_fast.yaml
    base: [_swin_base.yaml]           # paths relative to this file, applied in order
    model:
      init_args: {route_form: plain}  # only what differs

``expand_bases`` turns every ``--config FILE`` whose file has a ``base`` key into one
``--config`` holding the merged YAML text, before LightningCLI parses anything, so
``--print_config``, the saved ``config.yaml`` and DDP child processes all see one complete,
plain config. Merge rules: mappings merge key by key; a mapping whose ``class_path`` differs
from the base's replaces it whole (other classes take other arguments); lists and scalars
replace. Cycles and missing bases are a one-line error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "base"


def merge(base: Any, over: Any) -> Any:
    """Deep-merge ``over`` onto ``base`` with the rules of the module docstring."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    if "class_path" in over and over.get("class_path") != base.get("class_path"):
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(base[key], value) if key in base else value
    return merged


def load_composed(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset at ``path`` with its ``base`` chain applied (bases first)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise ValueError(f"config base cycle: {chain}")
    if not path.is_file():
        where = f" (base of {_stack[-1]})" if _stack else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, load_composed(path.parent / base, (*_stack, path)))
    return merge(merged, data)


def _has_base(path: str) -> bool:
    file = Path(path)
    if not file.is_file():
        return False
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False  # LightningCLI reports the parse error itself
    return isinstance(data, dict) and BASE_KEY in data


def expand_bases(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config FILE`` that has bases replaced by its merged YAML text."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        value: str | None = None
        if token in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif token.startswith("--config="):
            value, i = token.split("=", 1)[1], i + 1
        else:
            out.append(token)
            i += 1
            continue
        if _has_base(value):
            value = yaml.safe_dump(load_composed(value), sort_keys=False)
        out += ["--config", value]
    return out
