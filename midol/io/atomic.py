"""Writes that never leave a half-written file: temp file in the same folder, fsync, os.replace.

A temp file in ``$TMPDIR`` is not enough: when ``$TMPDIR`` is on another filesystem (node-local
scratch beside a shared checkpoint filesystem, the usual SLURM layout), the final move becomes a
copy, and a process killed during that copy leaves a truncated target and no previous version.
In the same folder, ``os.replace`` is atomic: readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_file_mode() -> int:
    """0666 minus the umask: files readable by colleagues (0644 under umask 022)."""
    # mkstemp's own mode is 0600
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block exits normally the temporary file
    is flushed to disk and renamed onto ``path``, otherwise it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
