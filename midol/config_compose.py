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

``trainer.callbacks`` may be a mapping ``{name: callback}`` (lightning-hydra-template's keyed
callbacks), so a derived preset adds one (a new name), replaces one (the same name) or drops one
(``name: null``) and keeps the rest::

    base: [../configs/pretrain/demo.yaml]
    trainer:
      callbacks:
        knn: {class_path: midol.callbacks.KNNMonitor, init_args: {...}}   # added
        routing_monitor: null                                             # dropped

A base that lists its callbacks gets names from the class: ``model_checkpoint``,
``model_checkpoint_2``, ``export_backbone``, ``preemption_checkpoint``, ... (snake case, a
number for repeats). The composed config holds a plain list (LightningCLI's form), in order.
A derived *list* still replaces the base's callbacks whole; it is warned about, naming the
callbacks it drops.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "base"


def callback_name(spec: Any) -> str:
    """``midol.callbacks.ExportBackbone`` -> ``export_backbone``."""
    path = spec.get("class_path", "callback") if isinstance(spec, dict) else str(spec)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", path.rsplit(".", 1)[-1]).lower()


def keyed_callbacks(callbacks: Any) -> dict[str, Any]:
    """A callbacks list as ``{name: spec}`` (:func:`callback_name`, ``_2``, ``_3`` for repeats);
    a mapping as it is."""
    if isinstance(callbacks, dict):
        return dict(callbacks)
    out: dict[str, Any] = {}
    for spec in callbacks or []:
        name = base = callback_name(spec)
        k = 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out[name] = spec
    return out


def _merge_callbacks(base: Any, over: Any, where: str) -> Any:
    if isinstance(over, dict):
        return merge(keyed_callbacks(base), over)
    if isinstance(over, list) and base:
        dropped = [n for n, spec in keyed_callbacks(base).items()
                   if spec is not None and spec not in over]
        if dropped:
            warnings.warn(f"{where}: its trainer.callbacks list replaces the base's, dropping "
                          f"{', '.join(dropped)}; to add or replace one and keep the others, "
                          "write callbacks as a mapping {name: callback} (docs/architecture.md, "
                          "Presets)", UserWarning, stacklevel=2)
    return over


def plain_callbacks(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a keyed ``trainer.callbacks`` turned into LightningCLI's list (null
    entries dropped)."""
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), dict):
        trainer = dict(trainer)
        trainer["callbacks"] = [spec for spec in trainer["callbacks"].values() if spec is not None]
        config = {**config, "trainer": trainer}
    return config


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


def load_composed(path: str | Path, _stack: tuple[Path, ...] = (), keyed: bool = False) -> dict[str, Any]:
    """The preset at ``path`` with its ``base`` chain applied (bases first); ``keyed`` keeps
    ``trainer.callbacks`` as a ``{name: callback}`` mapping (for composing further)."""
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
        merged = _compose(merged, load_composed(path.parent / base, (*_stack, path), keyed=True), path)
    merged = _compose(merged, data, path)
    return merged if keyed else plain_callbacks(merged)


OUTPUT_KEYS = ("dirpath", "output_dir", "image_dir", "save_dir")


def relocated(trainer: dict[str, Any], old_root: str, new_root: str) -> dict[str, Any]:
    """``trainer`` with every logger ``save_dir`` and callback output folder that lies in
    ``old_root`` moved to the same place under ``new_root``: a derived preset that sets
    ``trainer.default_root_dir`` moves all of its base's outputs (issue 27 item 1)."""
    old = old_root.rstrip("/")

    def move(value: Any) -> Any:
        if not isinstance(value, str) or "://" in value:
            return value
        if value.rstrip("/") == old:
            return new_root
        if value.startswith(old + "/"):
            return new_root.rstrip("/") + value[len(old):]
        return value

    def fix(spec: Any) -> Any:
        if not isinstance(spec, dict) or not isinstance(spec.get("init_args"), dict):
            return spec
        args = {k: move(v) if k in OUTPUT_KEYS else v for k, v in spec["init_args"].items()}
        return {**spec, "init_args": args}

    out = dict(trainer)
    logger = out.get("logger")
    out["logger"] = [fix(x) for x in logger] if isinstance(logger, list) else fix(logger)
    callbacks = out.get("callbacks")
    if isinstance(callbacks, dict):
        out["callbacks"] = {k: fix(v) for k, v in callbacks.items()}
    elif isinstance(callbacks, list):
        out["callbacks"] = [fix(v) for v in callbacks]
    return out


def _compose(base: dict[str, Any], over: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`merge`, with ``trainer.callbacks`` merged by name (:func:`_merge_callbacks`), and
    the base's outputs moved under a ``trainer.default_root_dir`` the derived preset sets."""
    base_trainer = base.get("trainer") if isinstance(base.get("trainer"), dict) else None
    over_trainer_ = over.get("trainer") if isinstance(over.get("trainer"), dict) else None
    if base_trainer is not None and over_trainer_ is not None:
        old_root, new_root = base_trainer.get("default_root_dir"), over_trainer_.get("default_root_dir")
        if isinstance(old_root, str) and isinstance(new_root, str) and old_root != new_root:
            base = {**base, "trainer": relocated(base_trainer, old_root, new_root)}
    base_cb = (base.get("trainer") or {}).get("callbacks") if isinstance(base.get("trainer"), dict) else None
    over_trainer = over.get("trainer") if isinstance(over.get("trainer"), dict) else None
    if over_trainer is None or "callbacks" not in over_trainer or base_cb is None:
        return merge(base, over)
    callbacks = _merge_callbacks(base_cb, over_trainer["callbacks"], str(path))
    merged = merge(base, {**over, "trainer": {k: v for k, v in over_trainer.items() if k != "callbacks"}})
    merged["trainer"] = {**merged.get("trainer", {}), "callbacks": callbacks}
    return merged


def _has_base(path: str) -> bool:
    file = Path(path)
    if not file.is_file():
        return False
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False  # LightningCLI reports the parse error itself
    if not isinstance(data, dict):
        return False
    trainer = data.get("trainer")
    return BASE_KEY in data or (isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), dict))


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
