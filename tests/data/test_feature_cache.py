"""FeatureCache: frozen-encoder features computed once per (encoder, transform, file)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import midol
from midol.data.feature_cache import (
    CachedFeatures,
    FeatureCache,
    file_fingerprint,
    weights_fingerprint,
)
from midol.data.image_io import UnreadableImageWarning, load_image
from midol.data.transforms.eval import EvalTransform

KEY = "toy-conv|seed0"
T16 = "EvalTransform(16)"


class CountingEncoder:
    """A fixed random 4x4/stride-4 conv + global mean pool; counts the images it encodes."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dim, 4, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
        self.seen = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.conv(x.float() / 255.0).mean(dim=(2, 3))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.ndim == 4
        assert not torch.is_grad_enabled()
        self.seen += x.shape[0]
        return self.encode(x)


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [_write_image(folder / f"img{i}.png", seed=i) for i in range(4)]
    paths.append(_write_image(folder / "img4.jpg", seed=4, size=(32, 48)))
    return [str(p) for p in paths]


@pytest.fixture
def cache(tmp_path: Path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def _direct(encoder: CountingEncoder, files: list[str], size: int) -> torch.Tensor:
    transform = EvalTransform(size)
    return encoder.encode(torch.stack([transform(load_image(f)) for f in files]))


def _run(
    cache: FeatureCache,
    encoder: CountingEncoder,
    files: Sequence[str | None],
    *,
    key: str = KEY,
    size: int = 16,
    batch_size: int = 64,
    num_workers: int = 0,
) -> CachedFeatures:
    encoder.seen = 0
    return cache.features(
        encoder,
        key,
        files,
        EvalTransform(size),
        f"EvalTransform({size})",
        batch_size=batch_size,
        num_workers=num_workers,
    )


def test_first_call_computes_second_reuses_bitwise(cache: FeatureCache, images: list[str]) -> None:
    enc = CountingEncoder()
    first = _run(cache, enc, images, batch_size=2)
    assert (first.computed, first.reused, enc.seen) == (5, 0, 5)
    assert first.features.dtype == torch.float32 and first.features.shape == (5, 8)
    assert first.ok.tolist() == [True] * 5 and first.unreadable == []
    torch.testing.assert_close(first.features, _direct(enc, images, 16))

    second = _run(cache, enc, images, batch_size=2)
    assert (second.computed, second.reused, enc.seen) == (0, 5, 0)
    assert torch.equal(second.features, first.features)
    assert second.ok.all()

    # A subset, in another order, comes from the cache row by row.
    subset = _run(cache, enc, [images[3], images[0]])
    assert (subset.computed, subset.reused, enc.seen) == (0, 2, 0)
    assert torch.equal(subset.features, first.features[[3, 0]])


def test_storage_layout(cache: FeatureCache, images: list[str]) -> None:
    _run(cache, CountingEncoder(), images[:3])
    entry = cache.entry_dir(KEY, T16)
    assert entry.parent == cache.root and len(entry.name) == 20
    assert entry != cache.entry_dir(KEY, "EvalTransform(24)")
    meta = json.loads((entry / "meta.json").read_text())
    assert meta == {
        "encoder_key": KEY,
        "transform_key": T16,
        "dim": 8,
        "midol_version": midol.__version__,
        "rows": 3,
    }
    assert json.loads((entry / "files.json").read_text()) == [
        file_fingerprint(f) for f in images[:3]
    ]
    stored = np.load(entry / "features.npy")
    assert stored.shape == (3, 8) and stored.dtype == np.float32

    # New files are appended after the old rows.
    _run(cache, CountingEncoder(), images)
    assert np.load(entry / "features.npy").shape == (5, 8)
    assert np.array_equal(np.load(entry / "features.npy")[:3], stored)
    assert json.loads((entry / "meta.json").read_text())["rows"] == 5


def test_other_encoder_key_or_transform_recomputes(cache: FeatureCache, images: list[str]) -> None:
    enc = CountingEncoder()
    base = _run(cache, enc, images)
    other_key = _run(cache, enc, images, key=KEY + "-v2")
    assert (other_key.computed, other_key.reused, enc.seen) == (5, 0, 5)
    assert torch.equal(other_key.features, base.features)  # same weights, so same values

    bigger = _run(cache, enc, images, size=24)
    assert (bigger.computed, bigger.reused, enc.seen) == (5, 0, 5)
    torch.testing.assert_close(bigger.features, _direct(enc, images, 24))
    assert not torch.allclose(bigger.features, base.features)

    # Both entries live on side by side.
    again = _run(cache, enc, images)
    assert (again.computed, again.reused) == (0, 5)


def test_touched_or_rewritten_file_recomputes_that_row_only(
    cache: FeatureCache, images: list[str]
) -> None:
    enc = CountingEncoder()
    base = _run(cache, enc, images)

    st = os.stat(images[1])
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched = _run(cache, enc, images)
    assert (touched.computed, touched.reused, enc.seen) == (1, 4, 1)
    assert torch.equal(touched.features, base.features)

    _write_image(Path(images[2]), seed=99)  # same size, other pixels
    st = os.stat(images[2])
    os.utime(images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    rewritten = _run(cache, enc, images)
    assert (rewritten.computed, rewritten.reused, enc.seen) == (1, 4, 1)
    torch.testing.assert_close(rewritten.features, _direct(enc, images, 16))
    assert not torch.allclose(rewritten.features[2], base.features[2])
    assert torch.equal(rewritten.features[[0, 1, 3, 4]], base.features[[0, 1, 3, 4]])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_inputs_and_unreadable_files(
    cache: FeatureCache, images: list[str], tmp_path: Path, num_workers: int
) -> None:
    corrupt = tmp_path / "images" / "x.png"
    corrupt.write_bytes(b"not an image")
    gone = str(tmp_path / "images" / "gone.png")
    files: list[str | None] = [images[0], None, str(corrupt), images[1], gone]
    enc = CountingEncoder()

    with pytest.warns(UnreadableImageWarning) as record:
        got = _run(cache, enc, files, num_workers=num_workers, batch_size=2)
    messages = [str(w.message) for w in record if issubclass(w.category, UnreadableImageWarning)]
    assert sum(str(corrupt) in m for m in messages) == 1
    assert sum(gone in m for m in messages) == 1
    assert got.ok.tolist() == [True, False, False, True, False]
    assert torch.isnan(got.features[[1, 2, 4]]).all()
    assert not torch.isnan(got.features[[0, 3]]).any()
    torch.testing.assert_close(got.features[[0, 3]], _direct(enc, [images[0], images[1]], 16))
    assert sorted(got.unreadable) == sorted([str(corrupt), gone])
    assert (got.computed, got.reused, enc.seen) == (2, 0, 2)

    # The corrupt file was not cached: it is tried (and warned about) again ...
    with pytest.warns(UnreadableImageWarning) as record:
        again = _run(cache, enc, files, num_workers=num_workers)
    assert any(str(corrupt) in str(w.message) for w in record)
    assert (again.computed, again.reused, enc.seen) == (0, 2, 0)
    assert str(corrupt) in again.unreadable

    # ... and once repaired it is encoded.
    _write_image(corrupt, seed=7)
    fixed = _run(cache, enc, [str(corrupt)], num_workers=num_workers)
    assert (fixed.computed, fixed.reused, enc.seen) == (1, 0, 1)
    assert fixed.unreadable == [] and fixed.ok.all()


def test_duplicates_are_computed_once(cache: FeatureCache, images: list[str]) -> None:
    enc = CountingEncoder()
    files: list[str | None] = [images[0], images[1], images[0], images[0], images[1]]
    got = _run(cache, enc, files)
    assert (got.computed, got.reused, enc.seen) == (2, 0, 2)
    assert torch.equal(got.features[0], got.features[2]) and torch.equal(
        got.features[0], got.features[3]
    )
    assert torch.equal(got.features[1], got.features[4])
    entry = cache.entry_dir(KEY, T16)
    assert len(json.loads((entry / "files.json").read_text())) == 2


def test_truncated_features_are_detected_and_recomputed(
    cache: FeatureCache, images: list[str]
) -> None:
    enc = CountingEncoder()
    base = _run(cache, enc, images)
    npy = cache.entry_dir(KEY, T16) / "features.npy"
    npy.write_bytes(npy.read_bytes()[:100])  # a half-written array

    with pytest.warns(UserWarning, match="unusable"):
        got = _run(cache, enc, images)
    assert (got.computed, got.reused, enc.seen) == (5, 0, 5)
    assert torch.equal(got.features, base.features)
    again = _run(cache, enc, images)
    assert (again.computed, again.reused) == (0, 5)


@pytest.mark.parametrize("offset,byte", [(20, b"{"), (10, b"\x00")])
def test_a_corrupt_npy_header_is_an_unusable_entry_not_a_crash(
    cache: FeatureCache, images: list[str], offset: int, byte: bytes
) -> None:
    """Issue 26 item 16: numpy parses the header as Python literals, so a flipped byte there
    raised tokenize.TokenError, which midol reported as a bug (exit 1)."""
    enc = CountingEncoder()
    base = _run(cache, enc, images)
    npy = cache.entry_dir(KEY, T16) / "features.npy"
    data = bytearray(npy.read_bytes())
    data[offset:offset + 1] = byte
    npy.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unusable .*(TokenError|SyntaxError)"):
        got = _run(cache, enc, images)
    assert (got.computed, got.reused) == (5, 0)
    assert torch.equal(got.features, base.features)


def test_a_non_finite_cached_row_is_encoded_again_and_replaced(
    cache: FeatureCache, images: list[str]
) -> None:
    """Issue 26 item 16: a NaN row in the cache was served, and training then stopped with a
    misleading "learning rate too high" hint."""
    enc = CountingEncoder()
    base = _run(cache, enc, images)
    npy = cache.entry_dir(KEY, T16) / "features.npy"
    feats = np.load(npy)
    feats[2] = np.nan
    np.save(npy, feats)
    with pytest.warns(UserWarning, match="1 cached feature row"):
        got = _run(cache, enc, images)
    assert (got.computed, got.reused) == (1, 4)
    assert torch.equal(got.features, base.features)
    assert np.isfinite(np.load(npy)).all() and len(np.load(npy)) == 5  # replaced, not appended
    again = _run(cache, enc, images)
    assert (again.computed, again.reused) == (0, 5)


def test_index_longer_than_features_or_wrong_dim_is_recomputed(
    cache: FeatureCache, images: list[str]
) -> None:
    enc = CountingEncoder()
    base = _run(cache, enc, images)
    entry = cache.entry_dir(KEY, T16)
    np.save(entry / "features.npy", np.load(entry / "features.npy")[:3])
    with pytest.warns(UserWarning, match="files.json lists 5 rows"):
        got = _run(cache, enc, images)
    assert (got.computed, got.reused) == (5, 0)
    assert torch.equal(got.features, base.features)

    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "dim": 4}))
    with pytest.warns(UserWarning, match="dim"):
        got = _run(cache, enc, images)
    assert (got.computed, got.reused) == (5, 0)
    assert torch.equal(got.features, base.features)


def test_extra_unindexed_rows_from_a_crashed_write_are_ignored(
    cache: FeatureCache, images: list[str]
) -> None:
    # A crash after features.npy but before files.json leaves rows past the index.
    enc = CountingEncoder()
    base = _run(cache, enc, images[:3])
    npy = cache.entry_dir(KEY, T16) / "features.npy"
    np.save(npy, np.concatenate([np.load(npy), np.full((2, 8), 7.0, np.float32)]))
    got = _run(cache, enc, images)
    assert (got.computed, got.reused) == (2, 3)
    assert torch.equal(got.features[:3], base.features)
    torch.testing.assert_close(got.features, _direct(enc, images, 16))
    assert np.load(npy).shape == (5, 8)


def test_interrupted_pass_keeps_the_rows_already_encoded(
    cache: FeatureCache, images: list[str]
) -> None:
    enc = CountingEncoder()
    calls = {"n": 0}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return enc(x)

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.features(flaky, KEY, images, EvalTransform(16), T16, batch_size=2)
    got = _run(cache, enc, images, batch_size=2)
    assert (got.computed, got.reused) == (3, 2)
    torch.testing.assert_close(got.features, _direct(enc, images, 16))


def test_bad_encoder_output_raises(cache: FeatureCache, images: list[str]) -> None:
    enc = CountingEncoder()
    with pytest.raises(ValueError, match="toy-3d"):
        cache.features(lambda x: enc(x)[:, :, None], "toy-3d", images, EvalTransform(16), T16)

    _run(cache, enc, images[:2])
    with pytest.raises(ValueError, match="4-dim features"):  # same key, another width
        cache.features(lambda x: enc(x)[:, :4], KEY, images, EvalTransform(16), T16)


def test_nothing_readable_raises(cache: FeatureCache, tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not an image")
    with (
        pytest.warns(UnreadableImageWarning),
        pytest.raises(ValueError, match="no readable image among 3 files for fundus"),
    ):
        cache.features(
            CountingEncoder(),
            KEY,
            [None, str(corrupt), None],
            EvalTransform(16),
            T16,
            desc="fundus",
        )


def test_file_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"12345")
    real, size, mtime = file_fingerprint(str(path)).split("|")
    assert real == os.path.realpath(path) and size == "5" and int(mtime) == path.stat().st_mtime_ns
    with pytest.raises(FileNotFoundError):
        file_fingerprint(str(tmp_path / "missing.bin"))


def test_weights_fingerprint(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several chunks
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + b"\x00")
    assert weights_fingerprint(a) == weights_fingerprint(str(b))
    assert weights_fingerprint(a) != weights_fingerprint(c)
    assert len(weights_fingerprint(a)) == 64
    assert weights_fingerprint(None) == "none"


def test_check_writable_refuses_a_cache_that_cannot_be_created(tmp_path):
    from midol.errors import OutputFileError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputFileError, match=r"cache_dir .*a_file/cache: the feature cache cannot be "
                                              r"written: .*a_file is a file, not a folder"):
        FeatureCache(blocker / "cache").check_writable()
    FeatureCache(tmp_path / "new" / "cache").check_writable()  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing created


def test_an_image_rewritten_in_place_with_the_same_size_and_mtime(tmp_path):
    """Issue 26 item 10: the default ``stat`` key serves the old row (documented); the
    ``content`` key sees the edit and encodes the new pixels."""
    import shutil

    path = tmp_path / "img.png"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(path)
    stat0 = path.stat()

    def encoder(images):
        return images.float().mean(dim=(2, 3))

    def run(key):
        return FeatureCache(tmp_path / f"cache_{key}", key=key).features(
            encoder, "mean", [str(path)], lambda a: torch.from_numpy(a).permute(2, 0, 1).contiguous(), "t")

    before = {k: run(k).features[0, 0].item() for k in ("stat", "content")}
    assert before == {"stat": 10.0, "content": 10.0}
    Image.new("RGB", (16, 16), (200, 200, 200)).save(path)  # same size on disk, other pixels
    assert path.stat().st_size == stat0.st_size
    os.utime(path, ns=(stat0.st_atime_ns, stat0.st_mtime_ns))
    stale, fresh = run("stat"), run("content")
    assert stale.features[0, 0].item() == 10.0 and stale.reused == 1  # the documented limit
    assert fresh.features[0, 0].item() == 200.0 and fresh.computed == 1
    copy = tmp_path / "copy.png"
    shutil.copy(path, copy)  # a copy has the same content key: reused
    again = FeatureCache(tmp_path / "cache_content", key="content").features(
        encoder, "mean", [str(copy)], lambda a: torch.from_numpy(a).permute(2, 0, 1).contiguous(), "t")
    assert again.reused == 1 and again.computed == 0
    with pytest.raises(ValueError, match="cache_key must be 'stat' or 'content'"):
        FeatureCache(tmp_path, key="mtime")
