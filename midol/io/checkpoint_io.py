"""Checkpoint files that survive a kill, and resumes that survive a damaged checkpoint.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies
in ``$TMPDIR``; when ``$TMPDIR`` is on another filesystem than the checkpoint folder (node-local
scratch beside a shared checkpoint filesystem, the usual SLURM layout) the final move is a copy
straight into ``last.ckpt``, and a process killed during that copy leaves a truncated
``last.ckpt`` and no previous version. :class:`AtomicCheckpointIO` (the default of ``midol fit``)
writes a temporary file beside the target, fsyncs it and renames it over the target
(:func:`midol.io.atomic.atomic_path`): readers see the old checkpoint or the new one, never a
part of one. A process killed mid-write leaves only a hidden ``.<name>.<random>.tmp`` beside the
target: no checkpoint search looks at it (it does not end in ``.ckpt``), and the next save of
that target removes it.

:func:`resolve_resume` is what ``midol fit --ckpt_path`` uses to read the checkpoint it resumes
from: an empty or truncated file (written by an older midol, or copied half-way) is replaced by
the newest readable checkpoint of the same folder, with a warning naming both files.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from midol.errors import CheckpointFileError
from midol.io.atomic import atomic_path, remove_stale_temporaries
from midol.io.weights import verify_archive

_ZIP_MAGIC = b"PK\x03\x04"
_LAST = re.compile(r"^last(-(\d+))?$")  # Lightning's names of save_last files (last, last-v1, ...)
_HPC = re.compile(r"^hpc_ckpt_\d+$")  # Lightning's SLURM save before a requeue (default_root_dir)


def _is_weights_only_refusal(err: BaseException) -> bool:
    """torch refused to unpickle an object (a checkpoint carrying code), not a damaged file."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temp file beside the target, fsync,
    ``os.replace``) and whose loads turn a damaged file into a one-line
    :class:`~midol.errors.CheckpointFileError` naming it. Remote paths (``s3://`` ...) keep
    Lightning's fsspec write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        with atomic_path(target) as tmp:
            torch.save(checkpoint, tmp)
        # from a writer killed before its rename: any age, since the run folder's lock keeps
        # every other writer of this checkpoint out
        remove_stale_temporaries(target, older_than_s=0)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as err:  # torch raises EOFError, OSError, KeyError ...
            if _is_weights_only_refusal(err):
                raise
            raise CheckpointFileError(f"{path}: {unreadable_reason(Path(path), err)}") from err


def unreadable_reason(path: Path, err: BaseException) -> str:
    """Why ``path`` could not be read as a checkpoint, in a few words."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size == 0:
        return "the checkpoint file is empty (0 bytes; its write was interrupted)"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"the checkpoint file is truncated or damaged ({size} bytes; {type(err).__name__}: {first})"


def read_checkpoint_file(path: str | Path, weights_only: bool | None = True) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (cheap: tensors are not read) when it is in
    torch's zip format, after its CRCs are checked (:func:`verify_archive`). A damaged file
    raises :class:`CheckpointFileError`; a file whose
    pickled objects ``weights_only`` refuses raises torch's ``UnpicklingError`` unchanged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    verify_archive(path)  # the mmap load below reads no tensor, so would not see a bit flip
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == _ZIP_MAGIC
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipped)
    except Exception as err:  # see AtomicCheckpointIO.load_checkpoint
        if _is_weights_only_refusal(err) or isinstance(err, PermissionError):
            raise
        raise CheckpointFileError(f"{path}: {unreadable_reason(path, err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointFileError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def last_checkpoint(folders: Sequence[str | Path], root: str | Path | None = None) -> Path | None:
    """What ``--ckpt_path last`` means: the newest ``last*.ckpt`` in ``folders`` (Lightning's
    rule) or ``hpc_ckpt_N.ckpt`` in ``root`` (what Lightning's SLURM environment saves on the
    signal of ``#SBATCH --signal=USR1@N`` before a requeue), or None."""
    found = [p for folder in folders if Path(folder).is_dir()
             for p in Path(folder).iterdir() if p.suffix == ".ckpt" and _LAST.match(p.stem)]
    if root is not None and Path(root).is_dir():
        found += [p for p in Path(root).iterdir() if p.suffix == ".ckpt" and _HPC.match(p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def resolve_resume(path: str | Path, weights_only: bool | None = True,
                   fallback: bool = True) -> tuple[Path, dict[str, Any]]:
    """``(file, checkpoint)`` to resume from for ``--ckpt_path path``: ``path`` itself when it
    can be read; else (``fallback``) the newest readable ``*.ckpt`` of its folder, with a
    warning naming both; else a :class:`CheckpointFileError` naming ``path``."""
    path = Path(path)
    try:
        return path, read_checkpoint_file(path, weights_only)
    except CheckpointFileError as err:
        if not fallback:
            raise
        reason = str(err)
    candidates = sorted((p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        try:
            ckpt = read_checkpoint_file(candidate, weights_only)
        except (CheckpointFileError, OSError, pickle.UnpicklingError):
            continue
        rank_zero_warn(f"{reason}; resuming from {candidate} instead, the newest readable "
                       f"checkpoint in {path.parent} (its progress since then is lost)")
        return candidate, ckpt
    raise CheckpointFileError(f"{reason}, and {path.parent} holds no other readable checkpoint: "
                              "start a new run (--overwrite true) or pass another --ckpt_path")
