"""Rebuild a pre-training module from its checkpoint without unpickling code."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch

from midol.methods.pretrain import PretrainModule
from midol.models.checkpoint_io import load_state_dict_file

# Rebuilding for inference: weights come from the state dict, so nothing is re-read or compiled.
_INFERENCE_OVERRIDES: dict[str, Any] = {
    "init_checkpoint": None, "compile": False, "grad_checkpointing": False,
}


def _module_class(hparams: dict[str, Any], path: Path) -> type[PretrainModule]:
    class_path = hparams.get("_class_path")  # written by LightningCLI (subclass mode)
    if not class_path:
        return PretrainModule
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: its module class {class_path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, PretrainModule)):
        raise ValueError(
            f"{path}: trained with {class_path}, which is not a PretrainModule; "
            "this tool reads pre-training checkpoints"
        )
    return cls


def load_pretrain_module(path: str | Path, device: str | torch.device = "cpu") -> PretrainModule:
    """A :class:`~midol.methods.PretrainModule` (or the subclass the run used) with the
    checkpoint's hyper-parameters and weights (strict), in eval mode on ``device``.

    The file is read with ``weights_only=True``; ``init_checkpoint`` is not re-read (the state
    dict holds the trained weights) and ``compile``/``grad_checkpointing`` are off."""
    path = Path(path)
    ckpt = load_state_dict_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(
            f"{path} is not a midol pre-training checkpoint (.ckpt with 'state_dict' and "
            "'hyper_parameters')"
        )
    hparams = dict(ckpt["hyper_parameters"])
    cls = _module_class(hparams, path)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(k for k in hparams if k not in accepted and not k.startswith("_"))
    if unknown:
        raise ValueError(
            f"{path}: hyper-parameters {unknown} are not arguments of {cls.__name__} "
            "(checkpoint from another midol version?)"
        )
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs.update({k: v for k, v in _INFERENCE_OVERRIDES.items() if k in accepted})
    module = cls(**kwargs)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the module its hyper-parameters build: {err}") from err
    return module.to(device).eval()
