"""Inputs shared by ``midol analyze`` and ``midol route``: data sources from a config file,
the image size and the device."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from midol.config_compose import load_composed
from midol.data.sources import DataSource


def sources_from_config(path: str | Path) -> tuple[list[DataSource], int | None]:
    """The ``DataSource`` list and evaluation image size of a data config: a ``midol fit``
    config (``data.init_args.sources``), a ``data:`` block, or a top-level ``sources:`` list.
    Relative paths are relative to the working directory, as in ``midol fit``. The size is
    ``eval_size``, or the transform's ``global_size``, when the config sets one; presets
    with ``base:`` are composed first (:mod:`midol.config_compose`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data config not found: {path}")
    config = load_composed(path)
    block: Any = config.get("data", config)
    if isinstance(block, dict) and "init_args" in block:
        block = block["init_args"]
    entries = block.get("sources") if isinstance(block, dict) else None
    if not entries or not isinstance(entries, list):
        raise ValueError(
            f"{path}: no data sources found (expected data.init_args.sources, data.sources or "
            "sources: a list of {path, modality, ...})"
        )
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: sources[{i}] must be a mapping with path and modality")
        try:
            sources.append(DataSource(**entry))
        except TypeError as err:
            raise ValueError(f"{path}: sources[{i}]: {err}") from err
    transform = block.get("transform") or {}
    transform = transform.get("init_args", transform) if isinstance(transform, dict) else {}
    size = block.get("eval_size") or transform.get("global_size") or block.get("global_size")
    return sources, int(size) if size else None


def module_image_size(module: Any) -> int:
    """The image size recorded with the method's default export (its timm overrides'
    ``img_size``; 224 otherwise, timm's Swin/ViT default)."""
    export = getattr(module, "export_modules", None)
    if callable(export):
        parts = export()
        if parts:
            part = next(iter(parts.values()))
            return int(part.image_size or part.overrides.get("img_size", 224))
    kwargs = dict(getattr(module, "hparams", {}).get("backbone_kwargs") or {})
    return int(kwargs.get("img_size", 224))


def resolve_image_size(explicit: int | None, config_size: int | None, module: Any) -> int:
    """The size images are routed/analysed at: ``--image-size`` when given, else the size the
    checkpoint was pre-trained at; a data config that says otherwise is named in a warning
    (a 64 px model routed at the config's 224 px sees other statistics, silently)."""
    if explicit is not None:
        if explicit < 8:
            raise ValueError(f"--image-size must be >= 8, got {explicit}")
        return int(explicit)
    trained = module_image_size(module)
    if config_size is not None and int(config_size) != trained:
        warnings.warn(
            f"the data config's image size is {config_size} px but the checkpoint was pre-trained "
            f"at {trained} px: using {trained} (pass --image-size {config_size} to use the "
            "config's)", stacklevel=2)
    return trained


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
