"""Checks ``midol fit`` makes before it trains, on the parsed (not yet instantiated) config.

* every output folder of the run can be created and written (else a one-line error naming it,
  before any training instead of at the first checkpoint);
* a run folder that already holds checkpoints is not silently overwritten (``--ckpt_path last``
  resumes it, ``--overwrite true`` starts over in it), neither by a resume of another run's
  checkpoint;
* a resumed checkpoint's hyper-parameters are compared with the config's: the config wins, and
  every setting that differs is named;
* one ``midol fit`` at a time per run folder (:class:`RunFolderLock`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from midol.errors import UsageError

# Init arguments of callbacks / loggers that name an output folder of the run.
OUTPUT_KEYS = ("dirpath", "output_dir", "image_dir", "save_dir")
# In the run folder, not the checkpoint folder (Lightning warns when that one is not empty).
LOCK_NAME = ".midol-fit.lock"
# Set to a non-zero rank in the other processes of a distributed run (launched by Lightning,
# torchrun or srun), which share rank 0's run folder and must not take its lock.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class OutputFolderError(PermissionError):
    """An output folder of the run cannot be created or written (``midol`` exit status 3)."""


def _items(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(spec: Any) -> str:
    return str(getattr(spec, "class_path", None) or (spec.get("class_path") if isinstance(spec, dict) else "")
               ).rpartition(".")[2]


def _init_args(spec: Any) -> Any:
    return spec.get("init_args") if hasattr(spec, "get") else None


def _is_local(path: Any) -> bool:
    return path is not None and "://" not in str(path)


def checkpoint_dirs(trainer: Any) -> list[str]:
    """The ``dirpath`` of every ModelCheckpoint of a parsed ``trainer`` config (after
    :func:`midol.cli.fill_output_dirs`), without duplicates."""
    dirs: list[str] = []
    for cb in _items(trainer.get("callbacks") if trainer is not None else None):
        args = _init_args(cb)
        if ("ModelCheckpoint" in _class_name(cb) and args is not None
                and _is_local(args.get("dirpath")) and str(args["dirpath"]) not in dirs):
            dirs.append(str(args["dirpath"]))
    return dirs


def output_dirs(trainer: Any) -> list[tuple[str, str]]:
    """``(folder, what names it)`` for every local output folder of a parsed ``trainer``."""
    out: list[tuple[str, str]] = []
    if trainer is None:
        return out
    if _is_local(trainer.get("default_root_dir")):
        out.append((str(trainer["default_root_dir"]), "trainer.default_root_dir"))
    for spec in [*_items(trainer.get("logger")), *_items(trainer.get("callbacks"))]:
        args = _init_args(spec)
        if args is None:
            continue
        for key in OUTPUT_KEYS:
            if key in args and _is_local(args.get(key)):
                out.append((str(args[key]), f"{_class_name(spec)} {key}"))
    return out


def check_writable(folder: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`OutputFolderError` unless ``folder`` exists as a writable folder or can be
    created. Creates nothing: a probe file is written in the nearest existing ancestor and
    removed."""
    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(
            f"{folder}: the run's output folder ({what}) cannot be created: {existing} is a "
            "file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".midol-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == path else f" (in {existing})"
        raise OutputFolderError(
            f"{folder}: the run's output folder ({what}) cannot be written{where}: "
            f"{err.strerror or err}") from err


def check_outputs_writable(trainer: Any) -> None:
    for folder, what in output_dirs(trainer):
        check_writable(folder, what)


def _held_checkpoints(folder: str) -> str:
    """The ``*.ckpt`` files of ``folder`` as a short list (``""`` when none)."""
    path = Path(folder)
    found = sorted(p.name for p in path.glob("*.ckpt")) if path.is_dir() else []
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def refuse_overwrite(trainer: Any) -> None:
    """A :class:`UsageError` when a checkpoint folder of the run already holds ``*.ckpt``."""
    for folder in checkpoint_dirs(trainer):
        shown = _held_checkpoints(folder)
        if shown:
            raise UsageError(
                f"{folder} already holds checkpoints of a previous run ({shown}): resume it with "
                "--ckpt_path last, start over in it with --overwrite true, or choose another "
                "folder with --trainer.default_root_dir")


def set_aside_checkpoints(trainer: Any, keep: str | None = None) -> list[Path]:
    """``--overwrite true``: move the previous run's ``*.ckpt`` of every checkpoint folder into
    ``<folder>/replaced-<time>/`` (nothing is deleted), so this run's ``best-*.ckpt`` is the only
    match of the documented glob (issue 27 item 5). ``keep``: a checkpoint being resumed, which
    stays where it is. Returns the folders written."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = Path(keep).resolve() if keep and _is_local(keep) else None
    moved_to: list[Path] = []
    for folder in checkpoint_dirs(trainer):
        path = Path(folder)
        old = [p for p in sorted(path.glob("*.ckpt")) if p.resolve() != kept] if path.is_dir() else []
        if not old:
            continue
        target = path / f"replaced-{stamp}"
        target.mkdir(exist_ok=True)
        for ckpt in old:
            os.replace(ckpt, target / ckpt.name)
        moved_to.append(target)
    return moved_to


def refuse_foreign_resume(trainer: Any, ckpt_path: str) -> None:
    """A :class:`UsageError` when ``ckpt_path`` lies outside every checkpoint folder of the run
    while one of them already holds ``*.ckpt``: resuming run A into run B's folder would replace
    B's newer ``last.ckpt`` (and its export and summary) with A's."""
    dirs = checkpoint_dirs(trainer)
    if not dirs:
        return
    ckpt = Path(ckpt_path) if _is_local(ckpt_path) else None
    real = ckpt.resolve() if ckpt is not None else None
    if real is not None and any(real.is_relative_to(Path(d).resolve()) for d in dirs):
        return  # this run's own checkpoint
    for folder in dirs:
        shown = _held_checkpoints(folder)
        if shown:
            where = ckpt.parent if ckpt is not None else ckpt_path
            raise UsageError(
                f"--ckpt_path {ckpt_path} is a checkpoint of another run ({where}), and this "
                f"run's folder {folder} already holds checkpoints of a previous run ({shown}) "
                "that resuming would replace: resume that run in its own folder, choose an empty "
                "folder with --trainer.default_root_dir, or replace them with --overwrite true")


class RunFolderLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``<folder>/.midol-fit.lock`` for the
    whole of one ``midol fit``: a second fit into the same folder is refused at once (one's
    clean-up of temporary checkpoint files deleted the other's checkpoint). The file holds the
    owner's PID for the message; the kernel drops the lock when the process exits, however it
    exits, so a killed run leaves no stale lock (the file itself stays). A no-op where ``fcntl``
    is missing (Windows) and in the non-zero ranks of a distributed run."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`UsageError` naming the folder and the owner's PID."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        if any(os.environ.get(v, "0") != "0" for v in _RANK_VARIABLES):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"{self.folder} is in use by another midol fit (PID {owner}; lock file "
                f"{self.path}): wait for it to end, or choose another folder with "
                "--trainer.default_root_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor drops a flock
            self._fd = None


def run_folder(trainer: Any) -> str:
    """The folder a ``midol fit`` run owns: ``trainer.default_root_dir`` (every output is filled
    from it, :func:`midol.cli.fill_output_dirs`), else Lightning's default, the working folder."""
    root = trainer.get("default_root_dir") if trainer is not None else None
    return str(root) if _is_local(root) and root else os.getcwd()


def _plain(value: Any) -> Any:
    """YAML-like value for comparisons: tuples as lists, mappings as dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def hparam_differences(saved: dict[str, Any], init_args: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, checkpoint value, config value)`` for each init argument that both the
    checkpoint's hyper-parameters and the config set, to different values."""
    diffs = []
    for name, value in init_args.items():
        if name.startswith("_") or name not in saved:
            continue
        old, new = _plain(saved[name]), _plain(value)
        if old != new:
            diffs.append((name, old, new))
    return diffs


def format_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} (checkpoint {old!r}, now {new!r})" for name, old, new in diffs)
