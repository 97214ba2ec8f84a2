"""Rebuild a trained method from its checkpoint without unpickling code."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch

from midol.errors import CheckpointFileError, UsageError, truncated_checkpoint_error
from midol.io.weights import load_state_dict_file
from midol.legacy import resolve_class_path
from midol.models.backbone import HubModelNameError

# Rebuilding for inference: weights come from the state dict, so nothing is re-read or compiled.
_INFERENCE_OVERRIDES: dict[str, Any] = {
    "init_checkpoint": None, "compile": False, "grad_checkpointing": False,
}
DEFAULT_CLASS_PATH = "midol.methods.MIDoL"  # checkpoints without _class_path predate other methods


def import_class(class_path: str, origin: str, allowed_prefixes: tuple[str, ...] = ("midol.",),
                 extra: tuple[str, ...] = ()) -> type:
    """The class ``class_path`` names; only under ``allowed_prefixes`` or listed in ``extra``
    (a checkpoint must not choose what code is imported)."""
    if not (class_path.startswith(allowed_prefixes) or class_path in extra):
        raise UsageError(
            f"{origin}: its module class {class_path!r} is outside midol; pass --class-path "
            f"{class_path} (or set it in the config) if you trust that code"
        )
    # a class that moved since the checkpoint was written: its current home, without warning
    # (a checkpoint cannot be edited; configs are warned about by midol.config_compose)
    module_name, _, name = resolve_class_path(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{origin}: its module class {class_path!r} cannot be imported: {err}") from err
    if not isinstance(cls, type):
        raise ValueError(f"{origin}: {class_path!r} is not a class")
    return cls


def accepted_arguments(cls: type) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts along its ``**kwargs`` chain; None when some class
    in the chain takes ``**kwargs`` that do not reach a known parent (anything may be valid)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items()
                  if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
        if klass is L.LightningModule:
            return None
    return names


def read_weights_file(path: str | Path) -> Any:
    """:func:`~midol.io.weights.load_state_dict_file` with the errors a user can act on: an
    empty or truncated file says so (:class:`CheckpointFileError`), as does any other file the
    readers refuse; a missing file is a ``FileNotFoundError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a checkpoint file (.ckpt)")
    empty = truncated_checkpoint_error(path)
    if empty is not None:
        raise empty
    try:
        return load_state_dict_file(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from err
    except Exception as err:  # every reader error: named with the file below
        truncated = truncated_checkpoint_error(path, err)
        if truncated is not None:
            raise truncated from err
        raise CheckpointFileError(str(err) if str(path) in str(err)
                                  else f"{path}: not a readable checkpoint ({err})") from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``, checked for what a method needs."""
    path = Path(path)
    ckpt = read_weights_file(path)
    if path.suffix == ".safetensors":
        raise UsageError(
            f"{path} is an exported backbone (.safetensors: backbone weights only, no heads, "
            "router or hyper-parameters), not a midol training checkpoint; pass the .ckpt it "
            "was exported from, or use the .safetensors as init_checkpoint"
        )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UsageError(
            f"{path} is not a midol training checkpoint (.ckpt with 'state_dict' and "
            "'hyper_parameters'); for an exported .safetensors use it as init_checkpoint"
        )
    return ckpt


def load_method(path: str | Path, device: str | torch.device = "cpu",
                trusted_class_paths: tuple[str, ...] = ()) -> Any:
    """The module class the run used (``_class_path``, default M-IDoL) with the checkpoint's
    hyper-parameters and weights (strict), in eval mode on ``device``.

    The file is read with ``weights_only=True``; ``init_checkpoint`` is not re-read (the state
    dict holds the trained weights) and ``compile``/``grad_checkpointing`` are off. Classes
    outside ``midol.`` are imported only when named in ``trusted_class_paths``."""
    path = Path(path)
    return method_from_checkpoint(read_checkpoint(path), path, device, trusted_class_paths)


def method_from_checkpoint(ckpt: dict[str, Any], path: str | Path,
                           device: str | torch.device = "cpu",
                           trusted_class_paths: tuple[str, ...] = ()) -> Any:
    """:func:`load_method` of a checkpoint already read (:func:`read_checkpoint`) from
    ``path``, for a caller that also needs its other entries."""
    path = Path(path)
    hparams = dict(ckpt["hyper_parameters"])
    # LightningCLI writes _class_path; BaseMethod writes midol_class_path (a plain Trainer)
    class_path = hparams.get("_class_path") or ckpt.get("midol_class_path") or DEFAULT_CLASS_PATH
    cls = import_class(class_path, str(path), extra=trusted_class_paths)
    if not issubclass(cls, L.LightningModule):
        raise ValueError(f"{path}: trained with {class_path}, which is not a LightningModule")
    accepted = accepted_arguments(cls)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if accepted is not None:
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            raise CheckpointFileError(
                f"{path}: hyper-parameters {unknown} are not arguments of {class_path} "
                "(the checkpoint was written by a version of that class with other arguments)"
            )
    kwargs.update({k: v for k, v in _INFERENCE_OVERRIDES.items()
                   if k in kwargs or (accepted is not None and k in accepted)})
    rebuild = getattr(cls, "inference_arguments", None)  # fine-tuned modules: the recorded recipe
    if callable(rebuild):
        kwargs = rebuild(ckpt, kwargs)
    try:
        module = _construct_outside_cli(cls, kwargs)
    except HubModelNameError as err:  # a backbone name the checkpoint chose: name the file
        raise HubModelNameError(f"{path}: {err}") from err
    prepare = getattr(module, "prepare_for_weights", None)
    if callable(prepare):
        prepare(ckpt)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointFileError(
            f"{path}: weights do not fit the module its hyper-parameters build: {err}") from err
    return module.to(device).eval()


def load_pretrain_module(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """:func:`load_method` for a pre-training checkpoint (the name of midol <= 0.1.0)."""
    return load_method(path, device)


def _construct_outside_cli(cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` with LightningCLI's "given hyper-parameters" context cleared: inside
    a CLI-instantiated module (a fine-tuning task loading its pre-trained backbone) the nested
    module's ``save_hyperparameters`` would otherwise record the outer module's arguments."""
    from lightning.pytorch.core.mixins import hparams_mixin

    token = hparams_mixin._given_hyperparameters.set(None)
    try:
        return cls(**kwargs)
    finally:
        hparams_mixin._given_hyperparameters.reset(token)
