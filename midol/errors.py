"""The errors ``midol`` reports to its user, their exit codes and their one-line form.

Exit codes of the ``midol`` command (docs/troubleshooting.md, "Errors and exit codes"):

====  ==========================================================================================
0     success
1     an unexpected error: a bug in midol or a library (printed with its traceback)
2     bad configuration or usage: an invalid option or config value (``ValueError``,
      ``TypeError``, :class:`UsageError`), argparse / LightningCLI errors
3     a missing or unreadable input file, or an output that cannot be written
      (``FileNotFoundError``, ``PermissionError``, ``UnreadableImageError``,
      :class:`InputFileError`: a non-UTF-8 CSV, a truncated ``.npz`` or ``.ckpt``, a streak
      of unreadable images)
4     training diverged (``FloatingPointError``: a non-finite loss)
130   interrupted (Ctrl-C)
====  ==========================================================================================

User errors (codes 2-4, 130) print one ``midol: error: ...`` message on stderr; the traceback
only with ``--debug`` or ``MIDOL_DEBUG=1``. The classes here subclass ``ValueError`` so code
that caught ``ValueError`` before keeps working.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TextIO

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MIDOL_DEBUG"
# --debug of the command being run (run_reporting sets it), for code that prints its own message
_DEBUG = contextvars.ContextVar("midol_debug", default=False)


class UnreadableImageError(Exception):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why (raised by
    :mod:`midol.data.image_io`; here so that the exit-status table needs no data import)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class Terminated(KeyboardInterrupt):
    """SIGTERM during work that is not a Lightning training loop (a feature pass, a routing
    table): raised like Ctrl-C, so what such work keeps on Ctrl-C it keeps on SIGTERM too;
    exit status 143. Inside ``fit`` Lightning's own handler and ``PreemptionCheckpoint`` act."""


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated`; the previous
    handler is restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MidolError(Exception):
    """Base of the errors midol raises for its user; ``exit_code`` is the command's status."""

    exit_code = EXIT_BUG


class UsageError(MidolError, ValueError):
    """An option or config value that cannot work (exit 2)."""

    exit_code = EXIT_USAGE


class InputFileError(MidolError, ValueError):
    """An input file that exists but cannot be read as what it should be (exit 3)."""

    exit_code = EXIT_INPUT


class OutputFileError(InputFileError):
    """An output path that cannot be written (exit 3), found before the work starts."""


class CheckpointFileError(InputFileError):
    """A checkpoint file that cannot be read: empty, truncated, not a torch file (exit 3)."""


class UnreadableStreakError(InputFileError):
    """Too many consecutive unreadable images to replace one from its neighbours (exit 3).
    Takes one message string (a DataLoader worker re-raises it in the main process that way)."""


def _union_cause(err: BaseException) -> BaseException:
    """The error a jsonargparse ``Union`` check wrapped (``model: LightningModule | None``
    turns a ``ValueError`` of ``__init__`` into "Does not validate against any of the Union
    subtypes ... Errors: - base_lr must be > 0"), else ``err``."""
    seen: set[int] = set()
    while (isinstance(err, ValueError) and id(err) not in seen
           and str(err).startswith("Does not validate against any of the Union subtypes")):
        seen.add(id(err))
        cause = err.__cause__
        if cause is None or str(cause).startswith("Expected a "):
            listed = re.findall(r"^\s*- (.+)$", str(err).split("\nGiven value", 1)[0], re.MULTILINE)
            inner = [m for m in listed if not m.startswith("Expected a <class 'NoneType'>")]
            return ValueError(inner[0]) if inner else err
        err = cause
    return err


def truncated_checkpoint_error(path: str | os.PathLike[str],
                               err: BaseException | None = None) -> CheckpointFileError | None:
    """``"<file> is empty or truncated (not a readable checkpoint)"`` when ``path`` has 0 bytes,
    or when reading it failed with ``err`` because its end is missing (a torch zip archive
    without its central directory, a pickle that ends early, a short safetensors file); else
    None. For every reader of checkpoint and weight files."""
    import zipfile
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size == 0:
        return CheckpointFileError(f"{path} is empty or truncated (not a readable checkpoint): "
                                   "the file has 0 bytes")
    if err is None:
        return None
    causes = [err] + ([err.__cause__] if err.__cause__ is not None else [])
    text = " ".join(str(c) for c in causes).lower()
    truncated = (any(isinstance(c, EOFError) for c in causes)
                 or "failed finding central directory" in text or "incomplete metadata" in text)
    if not truncated:
        try:
            with open(path, "rb") as fh:
                truncated = fh.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)
        except OSError:
            return None
    if not truncated:
        return None
    return CheckpointFileError(
        f"{path} is empty or truncated (not a readable checkpoint): {size} bytes, the end of the "
        "file is missing (an interrupted copy or save?)")


def _union_context(err: BaseException) -> str:
    """``"model midol.methods.PretrainModule: "`` for a jsonargparse ``Union`` error of the
    config's model (or data) class, else ``""``."""
    text = str(err)
    if not (isinstance(err, ValueError)
            and text.startswith("Does not validate against any of the Union subtypes")):
        return ""
    subtypes = text.split("\n", 2)[1] if text.count("\n") >= 1 else ""
    section = ("data" if "LightningDataModule" in subtypes else
               "model" if "LightningModule" in subtypes else "")
    found = re.search(r"Given value: Namespace\(class_path='([^']+)'", text)
    what = " ".join(x for x in (section, found.group(1) if found else "") if x)
    return f"{what}: " if what else ""


def root_error(err: BaseException) -> BaseException:
    """The error to report: ``err`` with library wrappers (jsonargparse unions) removed."""
    return _union_cause(err)


def _is_interrupt(err: BaseException) -> bool:
    """Ctrl-C, also when Lightning turned it into ``sys.exit(1)`` after a graceful shutdown."""
    if isinstance(err, KeyboardInterrupt):
        return True
    return (isinstance(err, SystemExit) and err.code == 1
            and isinstance(err.__context__, KeyboardInterrupt))


def exit_code(err: BaseException) -> int:
    """The ``midol`` exit status for ``err`` (see the module docstring)."""
    if isinstance(err, Terminated) or isinstance(err.__context__, Terminated):
        return EXIT_TERMINATED
    if _is_interrupt(err):
        return EXIT_INTERRUPTED
    err = root_error(err)
    if isinstance(err, MidolError):
        return err.exit_code
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                        FileExistsError, UnreadableImageError)):
        return EXIT_INPUT
    if isinstance(err, OSError) and err.errno in _FILE_ERRNOS:  # a full or read-only disk
        return EXIT_INPUT
    if isinstance(err, FloatingPointError):
        return EXIT_DIVERGED
    if isinstance(err, (ValueError, TypeError)):
        return EXIT_USAGE
    return EXIT_BUG


_FILE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENOENT}

_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def message(err: BaseException) -> str:
    """The text of ``err`` without a DataLoader worker's traceback (a worker re-raises its
    error with the worker's traceback in the message)."""
    text = str(err)
    found = _WORKER.match(text)
    if found:
        name = found.group(1)
        lines = text.rstrip().splitlines()
        for k in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[k].partition(": ")
            if sep and head.split(".")[-1] == name:
                return "\n".join([rest] + lines[k + 1:])
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return text or type(err).__name__


def format_error(err: BaseException) -> str:
    """``midol: error: <what went wrong>`` (``midol: interrupted`` for Ctrl-C)."""
    if isinstance(err, Terminated) or isinstance(err.__context__, Terminated):
        return "midol: terminated (SIGTERM); the work finished so far is kept"
    if _is_interrupt(err):
        return "midol: interrupted"
    root = root_error(err)
    text = _union_context(err) + message(root)
    if exit_code(err) == EXIT_BUG:
        text = (f"unexpected {type(root).__name__}: {text} (a bug in midol or a library it uses: "
                "please report it with the traceback above)")
    return f"midol: error: {text}"


def debug_requested(tokens: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (anywhere before a ``--``) or ``MIDOL_DEBUG=1`` asks for tracebacks,
    and ``tokens`` without the flag."""
    cut = tokens.index("--") if "--" in tokens else len(tokens)
    flag = DEBUG_FLAG in tokens[:cut]
    kept = [t for t in tokens[:cut] if t != DEBUG_FLAG] + tokens[cut:]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return flag or env, kept


def debug_active() -> bool:
    """Whether the running command asked for full messages and tracebacks (``--debug`` under
    :func:`run_reporting`, or ``MIDOL_DEBUG=1``)."""
    return _DEBUG.get() or debug_requested([])[0]


def _close_progress_bars() -> None:
    """End open tqdm bars (their line), so the error message starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
    for bar in list(bars or []):
        with contextlib.suppress(Exception):  # a broken bar must not hide the error
            bar.close()


def run_reporting(fn: Callable[[], int | None], debug: bool = False,
                  stream: TextIO | None = None) -> int:
    """``fn()`` with errors turned into an exit status: user errors as one ``midol: error:``
    message (their traceback with ``debug``), unexpected errors with their traceback.
    ``SystemExit`` passes through (argparse and LightningCLI have printed their message)."""
    stream = stream or sys.stderr
    token = _DEBUG.set(debug)
    try:
        result = fn()
    except SystemExit as err:
        if not _is_interrupt(err):
            raise
        _close_progress_bars()
        print(format_error(err), file=stream)
        return exit_code(err)
    except BaseException as err:  # the command's last line of defence
        if not isinstance(err, Exception) and not isinstance(err, KeyboardInterrupt):
            raise  # GeneratorExit and the like
        _close_progress_bars()
        code = exit_code(err)
        if debug or code == EXIT_BUG:
            traceback.print_exception(err, file=stream)
        print(format_error(err), file=stream)
        stream.flush()
        return code
    finally:
        _DEBUG.reset(token)
    return EXIT_OK if result is None else int(result)
