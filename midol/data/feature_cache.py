"""An on-disk cache of frozen-backbone image features (MedMIX fusion training).

A frozen expert backbone gives the same features for the same pixels forever, so each
(backbone, image file, transform) is encoded once and the fusion head then trains on cached
vectors in seconds per epoch. One cache entry (a folder named by ``encoder_key`` and
``transform_key``) holds:

* ``features.npy``: ``K x D`` float32, one row per cached file;
* ``files.json``: the ``K`` file fingerprints, in row order: ``realpath|size|mtime_ns`` (the
  default ``stat`` key: free, but an image rewritten in place with the same size and mtime keeps
  its stale row) or ``sha256:<digest>|size`` (``key="content"``: every file is read once per
  run to hash it, and no edit goes unseen);
* ``meta.json``: ``encoder_key``, ``transform_key``, ``dim``, ``midol_version``, ``rows``.

Rows are only ever appended; an edited image gets a new fingerprint and so a new row (its old
row stays, unused). ``features.npy`` is always written before the two JSON files, so a crash
leaves at worst extra unindexed rows, never an index pointing past the end of the array.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
import tokenize
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import midol
from midol.data.image_io import UnreadableImageError, UnreadableImageWarning, load_image
from midol.data.loader_utils import check_loader_args, worker_init
from midol.errors import OutputFileError, raise_on_sigterm
from midol.io.atomic import atomic_path, atomic_write_text

try:  # POSIX only; elsewhere concurrent writers to one entry are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CachedFeatures", "FeatureCache", "file_fingerprint", "weights_fingerprint"]

_CHUNK = 1 << 20
# file_fingerprint -> sha256: a multi-GB checkpoint is hashed once per process, and an edited
# file (new size/mtime) is hashed again.
_WEIGHTS_DIGESTS: dict[str, str] = {}


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``'<realpath>|<size>|<mtime_ns>'`` of an existing file; FileNotFoundError otherwise."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {os.fspath(path)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"not a regular file: {os.fspath(path)}")
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


CacheKey = Literal["stat", "content"]


def content_fingerprint(path: str | os.PathLike[str]) -> str:
    """``'sha256:<hex>|<size>'`` of a file's bytes (``cache_key: content``): an image edited in
    place with its size and mtime kept gets a new key, a copied or moved one keeps its key.
    Costs one read of every file per run (the ``stat`` key costs a ``stat`` call)."""
    file_fingerprint(path)  # the same errors for a missing or irregular file
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return f"sha256:{h.hexdigest()}|{size}"


def weights_fingerprint(path: str | os.PathLike[str] | None) -> str:
    """sha256 hex digest of a weights file's bytes, hashed once per process per file version;
    ``None`` -> ``'none'``."""
    if path is None:
        return "none"
    key = file_fingerprint(path)
    digest = _WEIGHTS_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        digest = _WEIGHTS_DIGESTS[key] = h.hexdigest()
    return digest


@dataclass
class CachedFeatures:
    """Features of ``files`` in their order.

    ``computed`` and ``reused`` count distinct files (a path listed twice is encoded once).
    """

    features: torch.Tensor  # N x D float32; NaN rows where ok is False
    ok: torch.Tensor  # N bool: a file was given and its image was readable
    computed: int  # distinct files encoded by this call
    reused: int  # distinct files read from the cache
    unreadable: list[str] = field(default_factory=list)  # not cached, so a fixed file is retried


@dataclass
class _Entry:
    features: np.ndarray  # K x D float32
    files: list[str]
    dim: int | None  # None: empty entry, any D accepted

    @property
    def index(self) -> dict[str, int]:
        return {fp: i for i, fp in enumerate(self.files)}


def _empty_entry() -> _Entry:
    return _Entry(np.zeros((0, 0), dtype=np.float32), [], None)


class _DecodeDataset(Dataset):
    """``(position, uint8 3 x S x S tensor or None, reason or None)`` per path.

    Failures come back as values rather than warnings because warnings raised in DataLoader
    workers never reach the caller."""

    def __init__(self, paths: Sequence[str], transform: Callable[[np.ndarray], torch.Tensor],
                 load: Callable[[str], np.ndarray] = load_image):
        self.paths = list(paths)
        self.transform = transform
        self.load = load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = self.load(self.paths[i])
        except UnreadableImageError as err:
            return i, None, err.reason
        return i, self.transform(image), None


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    # Failures are dropped from the stack but reported, so the caller can warn in its process.
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason or "unreadable") for i, x, reason in items if x is None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, failed


class FeatureCache:
    """Features of frozen encoders, cached under ``root`` per (encoder, transform, file)."""

    def __init__(self, root: str | os.PathLike[str], key: CacheKey = "stat") -> None:
        if key not in ("stat", "content"):
            raise ValueError(f"cache_key must be 'stat' or 'content', got {key!r}")
        self.root = Path(root)
        self.key = key

    def check_writable(self, option: str = "cache_dir") -> None:
        """Raise :class:`~midol.errors.OutputFileError` (exit 3, one line) unless the cache
        folder exists writable or can be created; creates nothing. Called at start, so a
        read-only cache fails before an hour-long feature pass, not after it."""
        existing = self.root.absolute()
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        problem = None if existing.is_dir() else f"{existing} is a file, not a folder"
        if problem is None:
            try:
                fd, probe = tempfile.mkstemp(prefix=".midol-write-check-", dir=existing)
                os.close(fd)
                os.unlink(probe)
            except OSError as err:
                problem = f"{existing} is not writable ({err.strerror or err})"
        if problem is not None:
            raise OutputFileError(f"{option} {self.root}: the feature cache cannot be written: {problem}")

    def entry_dir(self, encoder_key: str, transform_key: str) -> Path:
        """``root / sha256(encoder_key + '\\n' + transform_key).hexdigest()[:20]``."""
        name = hashlib.sha256(f"{encoder_key}\n{transform_key}".encode()).hexdigest()[:20]
        return self.root / name

    def features(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        encoder_key: str,
        files: Sequence[str | None],
        transform: Callable[[np.ndarray], torch.Tensor],
        transform_key: str,
        batch_size: int = 64,
        num_workers: int = 0,
        desc: str = "features",
        fingerprints: Sequence[str | None] | None = None,
        load: Callable[[str], np.ndarray] = load_image,
    ) -> CachedFeatures:
        """Features of ``files`` (``N x D`` float32 CPU), encoding only files not yet cached.

        ``encoder`` maps a uint8 ``B x 3 x S x S`` batch to ``B x D`` (normalisation and eval
        mode are the caller's); it runs under ``torch.no_grad()``. ``None`` entries, missing
        files and undecodable images give ``ok`` False and NaN rows (the latter two warned
        about with :class:`UnreadableImageWarning`).

        Items that are not files (rows of an ``.npz`` array) pass their own ``fingerprints``
        (one per item, e.g. ``'<npz fingerprint>#test[17]'``) and a ``load`` that maps an entry
        of ``files`` to a uint8 ``H x W x 3`` image; ``load`` must pickle for ``num_workers > 0``.

        Raises:
            ValueError: encoder output not 2-D or of another width than the cached entry, or
                no row could be computed or reused.
        """
        check_loader_args(batch_size, num_workers)
        n = len(files)
        entry_dir = self.entry_dir(encoder_key, transform_key)
        entry = self._load(entry_dir, encoder_key, transform_key, warn=True)
        cached = entry.index
        # A non-finite cached row (a crash mid-encode, a bad disk) would surface later as a
        # non-finite loss with a misleading hint: such rows are encoded again and replaced.
        finite = np.isfinite(entry.features).all(axis=1) if entry.features.size else np.ones(0, bool)
        stale = {fp for fp, row in cached.items() if not finite[row]}
        if stale:
            warnings.warn(f"{desc}: {len(stale)} cached feature row(s) in {entry_dir} are not "
                          "finite (NaN or inf); encoding those images again", UserWarning, stacklevel=2)

        given = list(fingerprints) if fingerprints is not None else None
        if given is not None and len(given) != n:
            raise ValueError(f"{desc}: {len(given)} fingerprints for {n} items")
        # Files are keyed by fingerprint, so a file listed twice (or via a symlink) is encoded once.
        keys: list[str | None] = []
        todo: dict[str, str] = {}  # fingerprint -> path to decode
        bad_paths: dict[str, None] = {}  # ordered set of unreadable paths
        for pos, f in enumerate(files):
            if f is None or (given is not None and given[pos] is None):
                keys.append(None)
                continue
            try:
                fp = (str(given[pos]) if given is not None
                      else content_fingerprint(f) if self.key == "content" else file_fingerprint(f))
            except OSError as err:
                if str(f) not in bad_paths:
                    why = "no such file" if isinstance(err, FileNotFoundError) else repr(err)
                    warnings.warn(
                        f"{desc}: skipping unreadable image {f}: {why}",
                        UnreadableImageWarning,
                        stacklevel=2,
                    )
                    bad_paths[str(f)] = None
                keys.append(None)
                continue
            keys.append(fp)
            if (fp not in cached or fp in stale) and fp not in todo:
                todo[fp] = str(f)

        new_rows, failed_fps = self._encode(
            encoder,
            encoder_key,
            transform,
            transform_key,
            entry,
            entry_dir,
            todo,
            batch_size=batch_size,
            num_workers=num_workers,
            desc=desc,
            load=load,
        )
        # Every path spelling of a file that failed to decode is reported, in input order.
        for f, maybe_fp in zip(files, keys, strict=True):
            if maybe_fp is not None and maybe_fp in failed_fps:
                bad_paths.setdefault(str(f), None)

        dim = entry.dim if entry.dim is not None else _first_dim(new_rows)
        reused_fps = {fp for fp in keys if fp is not None and fp in cached and fp not in stale}
        if dim is None or (not new_rows and not reused_fps):
            raise ValueError(f"no readable image among {n} files for {desc}")

        out = torch.full((n, dim), math.nan, dtype=torch.float32)
        ok = torch.zeros(n, dtype=torch.bool)
        stored = torch.from_numpy(entry.features) if reused_fps else None
        for i, maybe_fp in enumerate(keys):
            if maybe_fp is None:
                continue
            if maybe_fp in new_rows:
                out[i] = new_rows[maybe_fp]
                ok[i] = True
            elif maybe_fp in cached and stored is not None:
                out[i] = stored[cached[maybe_fp]]
                ok[i] = True
        return CachedFeatures(out, ok, len(new_rows), len(reused_fps), list(bad_paths))

    # -- encoding --------------------------------------------------------------------------

    def _encode(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        encoder_key: str,
        transform: Callable[[np.ndarray], torch.Tensor],
        transform_key: str,
        entry: _Entry,
        entry_dir: Path,
        todo: dict[str, str],
        batch_size: int,
        num_workers: int,
        desc: str,
        load: Callable[[str], np.ndarray] = load_image,
    ) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Encode ``todo`` (fingerprint -> path) and append the rows to the entry; returns the
        new rows (fingerprint -> D float32) and the fingerprints whose image failed to decode."""
        new_rows: dict[str, torch.Tensor] = {}
        failed: set[str] = set()
        if not todo:
            return new_rows, failed
        fps = list(todo)
        paths = [todo[fp] for fp in fps]
        loader = DataLoader(
            _DecodeDataset(paths, transform, load),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            worker_init_fn=worker_init if num_workers > 0 else None,
        )
        dim = entry.dim
        try:
            # SIGTERM (a scheduler's stop) keeps the rows encoded so far, as Ctrl-C does
            with raise_on_sigterm(), torch.no_grad():
                for positions, images, failures in tqdm(
                    loader, total=len(loader), desc=desc, unit="batch", disable=None
                ):
                    for pos, reason in failures:
                        warnings.warn(
                            f"{desc}: skipping unreadable image {paths[pos]}: {reason}",
                            UnreadableImageWarning,
                            stacklevel=3,
                        )
                        failed.add(fps[pos])
                    if images is None:
                        continue
                    feats = _check_output(encoder(images), len(positions), encoder_key)
                    if dim is None:
                        dim = feats.shape[1]
                    elif feats.shape[1] != dim:
                        raise ValueError(
                            f"encoder {encoder_key!r} gives {feats.shape[1]}-dim features but "
                            f"the cache entry {entry_dir} holds {dim}-dim ones"
                        )
                    for pos, row in zip(positions, feats, strict=True):
                        new_rows[fps[pos]] = row
        except BaseException:
            # Keep what was encoded before the failure: an interrupted hour-long pass resumes.
            if new_rows:
                with contextlib.suppress(Exception):
                    self._append(entry_dir, encoder_key, transform_key, new_rows)
            raise
        if new_rows:
            self._append(entry_dir, encoder_key, transform_key, new_rows)
        return new_rows, failed

    # -- storage ---------------------------------------------------------------------------

    def _load(self, entry_dir: Path, encoder_key: str, transform_key: str, warn: bool) -> _Entry:
        """The entry in ``entry_dir``; an empty one when absent or inconsistent (warned)."""
        paths = [entry_dir / name for name in ("meta.json", "features.npy", "files.json")]
        present = [p.is_file() for p in paths]
        if not any(present):
            return _empty_entry()

        def broken(why: str) -> _Entry:
            if warn:
                warnings.warn(
                    f"feature cache entry {entry_dir} is unusable ({why}); recomputing it",
                    UserWarning,
                    stacklevel=4,
                )
            return _empty_entry()

        if not all(present):
            missing = ", ".join(p.name for p, ok in zip(paths, present, strict=True) if not ok)
            return broken(f"missing {missing}")
        try:
            meta = json.loads(paths[0].read_text(encoding="utf-8"))
            index = json.loads(paths[2].read_text(encoding="utf-8"))
            feats = np.load(paths[1], allow_pickle=False)
        except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError) as err:
            # truncated JSON or npy, bad UTF-8, a corrupt npy header (numpy parses it as Python
            # literals: TokenError / SyntaxError, which escaped as "a bug" before)
            return broken(f"{type(err).__name__}: {err}")
        if not isinstance(meta, dict) or not isinstance(index, list):
            return broken("malformed meta.json or files.json")
        if not all(isinstance(fp, str) for fp in index):
            return broken("files.json is not a list of fingerprints")
        if meta.get("encoder_key") != encoder_key or meta.get("transform_key") != transform_key:
            return broken("meta.json names another encoder or transform")
        if feats.ndim != 2 or feats.dtype != np.float32:
            return broken(f"features.npy is {feats.dtype} with shape {feats.shape}")
        if len(index) > feats.shape[0]:
            return broken(
                f"files.json lists {len(index)} rows, features.npy holds {feats.shape[0]}"
            )
        if meta.get("dim") != feats.shape[1]:
            return broken(f"meta.json dim {meta.get('dim')} != features.npy width {feats.shape[1]}")
        # Rows past the index are from a write that crashed before files.json: drop them.
        return _Entry(feats[: len(index)], index, int(feats.shape[1]))

    def _append(
        self,
        entry_dir: Path,
        encoder_key: str,
        transform_key: str,
        new_rows: dict[str, torch.Tensor],
    ) -> None:
        entry_dir.mkdir(parents=True, exist_ok=True)
        with _locked(entry_dir / ".lock"):
            # Reload under the lock so rows another process appended meanwhile are kept.
            entry = self._load(entry_dir, encoder_key, transform_key, warn=False)
            dim = next(iter(new_rows.values())).shape[0]
            if entry.dim is not None and entry.dim != dim:
                raise ValueError(
                    f"encoder {encoder_key!r} gives {dim}-dim features but the cache entry "
                    f"{entry_dir} holds {entry.dim}-dim ones"
                )
            rows = {fp: i for i, fp in enumerate(entry.files)}
            feats = entry.features.reshape(-1, dim)
            fix = [fp for fp in new_rows if fp in rows and not np.isfinite(feats[rows[fp]]).all()]
            add = [fp for fp in new_rows if fp not in rows]
            if not add and not fix:
                return
            if fix:  # non-finite rows replaced in place (their index entries stay)
                feats = feats.copy()
                for fp in fix:
                    feats[rows[fp]] = new_rows[fp].numpy()
            if add:
                block = torch.stack([new_rows[fp] for fp in add]).numpy().astype(np.float32)
                feats = np.concatenate([feats, block], axis=0)
            files = entry.files + add
            with atomic_path(entry_dir / "features.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, feats, allow_pickle=False)  # a file object: np.save adds no suffix
            atomic_write_text(entry_dir / "files.json", json.dumps(files))
            meta: dict[str, Any] = {
                "encoder_key": encoder_key,
                "transform_key": transform_key,
                "dim": dim,
                "midol_version": midol.__version__,
                "rows": len(files),
            }
            atomic_write_text(entry_dir / "meta.json", json.dumps(meta, indent=2) + "\n")


def _check_output(out: Any, batch: int, encoder_key: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"encoder {encoder_key!r} must return a {batch} x D tensor for a batch of {batch} "
            f"images, got {shape}"
        )
    return out.detach().to(device="cpu", dtype=torch.float32)


def _first_dim(rows: dict[str, torch.Tensor]) -> int | None:
    return next(iter(rows.values())).shape[0] if rows else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (serialises writers of one entry)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
