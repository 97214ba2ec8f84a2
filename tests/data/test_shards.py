"""Streaming corpus: WebDataset shards written from the real sample corpus, read back exactly,
drawn with per-modality weights, split over ranks and workers, resumed mid-epoch, trained on."""

from __future__ import annotations

import collections
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from midol.data import (  # noqa: E402
    DataSource,
    MultiCropTransform,
    UnreadableImageWarning,
    load_image,
    resolve_source,
)
from midol.data.image_io import decode_image_bytes  # noqa: E402
from midol.data.shards import (  # noqa: E402
    ShardedPretrainDataModule,
    ShardIndex,
    ShardStream,
    write_shards,
)
from midol.data.shards import stream as stream_module  # noqa: E402
from midol.data.shards.index import OFFSETS_SUFFIX, offsets_path, scan_sample_offsets  # noqa: E402
from midol.data.shards.stream import _image_of, _read_samples, _read_shard, _tar_files  # noqa: E402
from midol.tools import cmd_shard as shard_tool  # noqa: E402
from tests.helpers.tiny import tiny_module  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZES = {"xray": 60, "pathology": 41, "fundus": 200, "oct": 16}


def sample_sources(sample_data: Path) -> list[DataSource]:
    return [
        DataSource(str(sample_data / "xray"), "xray"),
        DataSource(str(sample_data / "pathology"), "pathology"),
        DataSource(str(sample_data / "fundus_retinamnist.npz"), "fundus"),
        DataSource(str(sample_data / "oct"), "oct"),
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> ShardIndex:
    out = tmp_path_factory.mktemp("shards")
    return write_shards(sample_sources(sample_data), out, shard_size=20, progress=False)


def tiny_dm(index: ShardIndex, **kwargs) -> ShardedPretrainDataModule:
    sizes = {k: kwargs.pop(k) for k in ("global_size", "local_size", "num_local") if k in kwargs}
    args = dict(batch_size=8, num_workers=0, samples_per_epoch=96,
                transform=MultiCropTransform(**{"global_size": 32, "local_size": 16,
                                                "num_local": 2, **sizes}))
    args.update(kwargs)
    return ShardedPretrainDataModule(str(index.root / "index.json"), **args)


def test_shards_hold_every_image_bit_exactly(shards: ShardIndex, sample_data: Path) -> None:
    assert {m: shards.num_samples(m) for m in shards.modalities} == SIZES
    assert shards.counts["fundus"] == [20] * 10 and shards.counts["pathology"] == [20, 20, 1]
    assert ShardIndex.load(shards.root).counts == shards.counts  # index.json round trip
    fundus = resolve_source(sample_sources(sample_data)[2])
    for modality in ("xray", "fundus"):
        seen = 0
        for shard in shards.shards[modality]:
            for sample in _read_shard(shards.url(shard)):
                data, origin = _image_of(sample)
                decoded = decode_image_bytes(data, origin)
                if modality == "xray":  # the file's own bytes, decoded like load_image
                    assert "png" in sample and data == Path(origin).read_bytes()
                    expected = load_image(origin)
                else:  # npz rows: lossless PNG of the array row
                    row = int(origin.rsplit("[", 1)[1].rstrip("]"))
                    expected = fundus.load(row)
                assert decoded.dtype == np.uint8 and np.array_equal(decoded, expected)
                assert json.loads(sample["json"])["modality"] == modality
                seen += 1
        assert seen == SIZES[modality]


def test_unreadable_files_are_skipped_and_listed(tmp_path: Path, sample_data: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted((sample_data / "oct").rglob("*.png"))[:2]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UnreadableImageWarning, match="broken.png"):
        index = write_shards([DataSource(str(folder), "oct")], tmp_path / "out", progress=False)
    assert index.counts == {"oct": [2]}
    assert len(index.skipped) == 1 and "broken.png" in index.skipped[0]
    with pytest.raises(FileExistsError):
        write_shards([DataSource(str(folder), "oct")], tmp_path / "out", progress=False)


def test_modality_weights_set_the_share_of_draws(shards: ShardIndex) -> None:
    dm = tiny_dm(shards, modality_weights={"xray": 3.0, "oct": 1.0}, samples_per_epoch=480,
                 batch_size=16, global_size=16, local_size=8, num_local=1)
    assert dm.expected_shares() == {"xray": 0.75, "pathology": 0.0, "fundus": 0.0, "oct": 0.25}
    mods = torch.cat([b["modality"] for b in dm.train_dataloader()])
    assert len(mods) == 480
    counts = collections.Counter(dm.modalities[i] for i in mods.tolist())
    assert set(counts) == {"xray", "oct"}
    assert counts["xray"] / 480 == pytest.approx(0.75, abs=0.06)  # 3 sigma of 480 draws
    # default: every image equally likely, so modalities in proportion to their sizes
    assert tiny_dm(shards).expected_shares()["fundus"] == pytest.approx(200 / 317)


def test_ranks_and_workers_read_disjoint_parts(shards: ShardIndex) -> None:
    """4 slots (2 ranks x 2 workers): fundus (10 shards) is split by shard, xray (3 shards)
    by sample; in both, one pass of every slot covers each image exactly once."""
    stream = ShardStream(shards, lambda x: x, {m: 1.0 for m in shards.modalities}, 8, 1,
                         shuffle_buffer=0)
    for m, name in enumerate(shards.modalities):
        if name not in ("fundus", "xray"):
            continue
        parts = []
        for slot in range(4):
            if name == "fundus":
                supply = sum(c for c in shards.counts[name][slot::4])
            else:
                supply = len(range(slot, SIZES[name], 4))
            gen = stream._modality_stream(m, epoch=0, slot=slot, slots=4)
            parts.append({_image_of(next(gen))[1] for _ in range(supply)})
        assert sum(len(p) for p in parts) == SIZES[name]
        assert len(set().union(*parts)) == SIZES[name]  # disjoint and complete


@pytest.mark.timeout(120)
def test_resume_mid_epoch_matches_uninterrupted_run(shards: ShardIndex) -> None:
    dm = tiny_dm(shards, num_workers=2, persistent_workers=False)
    full = list(dm.train_dataloader())
    assert len(full) == 12
    again = list(dm.train_dataloader())  # a fresh loader replays epoch 0 exactly
    assert all(torch.equal(a["views"][0], b["views"][0]) for a, b in zip(full, again))
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches_done": 5, "world_size": 1, "num_workers": 2,
                            "batch_size": 8})
    resumed = list(loader)
    assert len(resumed) == 7
    for a, b in zip(resumed, full[5:]):
        assert torch.equal(a["index"], b["index"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    nxt = list(loader)  # the loader goes on with epoch 1: other draws
    assert not torch.equal(nxt[0]["views"][0], full[0]["views"][0])


@pytest.mark.timeout(120)
def test_pretrain_module_trains_from_shards(shards: ShardIndex) -> None:
    torch.manual_seed(0)
    module = tiny_module()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    dm = tiny_dm(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    assert trainer.global_step == 3 and dm.collate.num_global == 2  # the batches carry it
    assert int(module.images_seen) == 24


def test_shard_tool_and_errors(tmp_path: Path, sample_data: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # the demo config's sources are relative to the repository
    out = tmp_path / "demo_shards"
    assert shard_tool.main(["--from-config", "configs/pretrain/demo.yaml", "--out", str(out),
                            "--shard-size", "50", "--no-progress"]) == 0
    index = ShardIndex.load(out / "index.json")
    assert index.modalities == ["xray", "pathology", "oct", "fundus"]
    assert index.counts["fundus"] == [50] * 4
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        shard_tool.main(["--out", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="not in the shards"):
        ShardedPretrainDataModule(str(out), modality_weights={"mri": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        ShardedPretrainDataModule(str(out), modality_weights={"xray": 0.0})
    with pytest.raises(FileNotFoundError, match="midol shard"):
        ShardedPretrainDataModule(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> ShardIndex:
    """pathology (41 tiles) and oct (16 scans), one shard each."""
    out = tmp_path_factory.mktemp("one_shard")
    return write_shards(sample_sources(sample_data)[1::2], out, shard_size=1000, progress=False)


def test_offsets_file_matches_the_tar_headers(shards: ShardIndex) -> None:
    for modality in ("xray", "pathology"):
        for i, shard in enumerate(shards.shards[modality]):
            url = shards.url(shard)
            written = np.load(offsets_path(url))
            assert np.array_equal(written, scan_sample_offsets(url))
            assert written[0] == 0 and len(written) == shards.counts[modality][i] + 1
            whole = list(_read_shard(url))
            picks = [len(whole) - 1, 0, 2] if len(whole) > 2 else [0]
            for k, sample in zip(sorted(picks), _read_samples(url, written, sorted(picks))):
                assert sample == whole[k]  # key, url and every file's bytes


class _Counting:
    """A shard file that counts the bytes read from it."""

    def __init__(self, path: str, tally: list[int]) -> None:
        self.f, self.tally = open(path, "rb"), tally

    def seek(self, pos: int) -> int:
        return self.f.seek(pos)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.tally[0] += len(data)
        return data

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_each_worker_reads_only_its_slice_of_a_shard(one_shard: ShardIndex, monkeypatch) -> None:
    """2 ranks x 3 workers, pathology in one shard of 41: each slot reads its 6-7 samples'
    bytes, about 1/6 of the shard (before: all of it), and the slots' samples are disjoint
    and complete."""
    def whole_shard(url: str):
        raise AssertionError(f"read {url} in full")

    monkeypatch.setattr(stream_module, "_read_shard", whole_shard)
    m = one_shard.modalities.index("pathology")
    offsets = np.load(offsets_path(one_shard.url(one_shard.shards["pathology"][0])))
    sizes = np.diff(offsets)
    stream = ShardStream(one_shard, lambda x: x, {m: 1.0 for m in one_shard.modalities}, 8, 1,
                         shuffle_buffer=0)
    origins, shares = [], []
    for rank in range(2):
        for worker in range(3):
            slot = rank * 3 + worker
            tally = [0]
            monkeypatch.setattr(stream_module, "_open_local", lambda p, t=tally: _Counting(p, t))
            picks = range(slot, 41, 6)
            gen = stream._modality_stream(m, epoch=0, slot=slot, slots=6)
            origins.append([_image_of(next(gen))[1] for _ in picks])
            assert tally[0] == sum(int(sizes[k]) for k in picks)  # its samples' bytes, no more
            shares.append(tally[0] / offsets[-1])
    assert sum(shares) == pytest.approx(1.0)  # every byte of the shard read once over all slots
    assert max(shares) < 0.3 and min(shares) > 0.08  # ~1/6 each
    flat = [o for part in origins for o in part]
    assert len(flat) == len(set(flat)) == 41  # disjoint and complete


def test_old_shards_without_offsets_are_scanned_once(one_shard: ShardIndex, tmp_path: Path,
                                                     monkeypatch) -> None:
    old = tmp_path / "old"
    shutil.copytree(one_shard.root, old)
    for side in old.rglob("*" + OFFSETS_SUFFIX):
        side.unlink()
    index = ShardIndex.load(old)
    stream = ShardStream(index, lambda x: x, {m: 1.0 for m in index.modalities}, 8, 1,
                         shuffle_buffer=0)
    m = index.modalities.index("oct")
    with pytest.warns(UserWarning, match="no .offsets.npy file .* midol shard"):
        gen = stream._modality_stream(m, epoch=0, slot=1, slots=4)
        got = [_image_of(next(gen))[1] for _ in range(4)]
    whole = [_image_of(s)[1] for s in _read_shard(index.url(index.shards["oct"][0]))]
    assert got == whole[1::4]
    # a shard the index names by a pipe: URL cannot be sought: read in full, with a warning
    data = json.loads((old / "index.json").read_text())
    data["modalities"]["oct"]["shards"] = [f"pipe:cat {old / index.shards['oct'][0]}"]
    (old / "index.json").write_text(json.dumps(data))
    piped = ShardIndex.load(old)
    stream = ShardStream(piped, lambda x: x, {m: 1.0 for m in piped.modalities}, 8, 1,
                         shuffle_buffer=0)
    with pytest.warns(UserWarning, match="not a local file: every data-loading worker reads it"):
        gen = stream._modality_stream(m, epoch=0, slot=1, slots=4)
        assert [_image_of(next(gen))[1] for _ in range(4)] == whole[1::4]
    # offsets that do not fit the index: a clear error
    np.save(old / (index.shards["oct"][0] + OFFSETS_SUFFIX), np.arange(5))
    with pytest.raises(ValueError, match="shard changed after indexing"):
        index.sample_offsets("oct", 0)


def test_max_side_shrinks_once_as_png_or_jpeg(tmp_path: Path, sample_data: Path) -> None:
    """--max-side: the longest side becomes max_side (area interpolation), stored as a
    lossless PNG (bit-exact) or, with --encoding jpg, a JPEG close to it."""
    import cv2

    files = sorted((sample_data / "oct").rglob("*.png"))[:3]
    folder = tmp_path / "oct"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    decoded = {}
    for enc in ("png", "jpg"):
        assert shard_tool.main(["--source", str(folder), "oct", "--out", str(tmp_path / enc),
                                "--max-side", "64", "--encoding", enc, "--quality", "90",
                                "--no-progress"]) == 0
        index = ShardIndex.load(tmp_path / enc)
        samples = list(_read_shard(index.url(index.shards["oct"][0])))
        assert all(enc in s for s in samples)
        decoded[enc] = {_image_of(s)[1]: decode_image_bytes(*_image_of(s)) for s in samples}
    for f in files:
        image = load_image(folder / f.name)
        h, w = image.shape[:2]
        s = 64 / max(h, w)
        expected = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        png, jpg = decoded["png"][str(folder / f.name)], decoded["jpg"][str(folder / f.name)]
        assert max(png.shape[:2]) == 64 and np.array_equal(png, expected)
        err = np.abs(jpg.astype(int) - expected.astype(int)).mean()
        assert jpg.shape == expected.shape and 0 < err < 3  # lossy, but close
    with pytest.raises(ValueError, match="encoding must be one of png, jpg"):
        write_shards([DataSource(str(folder), "oct")], tmp_path / "x", encoding="webp")
    with pytest.raises(SystemExit):
        shard_tool.main(["--source", str(folder), "oct", "--out", str(tmp_path / "q"),
                         "--quality", "0"])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt: int, sample_data: Path) -> None:
    """midol's tar member reader against Python's tarfile: long names (ustar prefix, GNU
    long-name and pax path records), empty and multi-block members, a directory entry."""
    files = {"a/" + "d" * 120 + "/000001.png": (sample_data / "oct").rglob("*.png").__next__()
             .read_bytes(), "000001.json": b'{"x": 1}', "000002.cls": b"", "x.txt": b"y" * 512}
    if fmt == tarfile.USTAR_FORMAT:  # ustar: a long name only as prefix/name (<= 155 + 100)
        files = {k.replace("d" * 120, "d" * 90): v for k, v in files.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("adir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a sample: skipped
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(_tar_files(buf.getvalue())) == expected == list(files.items())
    broken = bytearray(buf.getvalue())
    broken[600] ^= 1  # a header byte: its checksum no longer matches
    with pytest.raises(ValueError, match="checksum"):
        list(_tar_files(bytes(broken)))


def test_routing_stream_gives_every_sample_once(shards: ShardIndex) -> None:
    """EvalStream (routing tables): every image once, numbered in index order, the same
    through the offsets files as through webdataset's reader."""
    from midol.data.shards.stream import EvalStream

    items = list(EvalStream(shards, 16))
    assert [x["index"] for x in items] == list(range(shards.num_samples()))
    whole = [_image_of(s)[1] for m in shards.modalities for sh in shards.shards[m]
             for s in _read_shard(shards.url(sh))]
    assert [x["path"] for x in items] == whole
    assert all(x["image"].shape[-2:] == (16, 16) for x in items)


def test_add_offsets_writes_what_the_writer_would(one_shard: ShardIndex, tmp_path: Path,
                                                  capsys) -> None:
    old = tmp_path / "old"
    shutil.copytree(one_shard.root, old)
    sides = sorted(old.rglob("*" + OFFSETS_SUFFIX))
    written = {p: p.read_bytes() for p in sides}
    for side in sides:
        side.unlink()
    assert shard_tool.main(["--add-offsets", str(old)]) == 0
    assert "2 written, 0 already there" in capsys.readouterr().out
    assert all(np.array_equal(np.load(p), np.load(io.BytesIO(b))) for p, b in written.items())
    assert shard_tool.main(["--add-offsets", str(old / "index.json")]) == 0
    assert "0 written, 2 already there" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        shard_tool.main(["--add-offsets", str(old), "--out", str(tmp_path / "x")])


def test_a_source_read_with_options_is_stored_as_it_is_read(tmp_path: Path, sample_data: Path) -> None:
    """A 12-bit PNG source (``bits: 12``) is stored as the 8-bit image midol reads from it, not
    as the file's bytes, which a shard reader would scale by the 16-bit rule (almost black)."""
    import cv2

    real = load_image(sorted((sample_data / "oct").rglob("*.png"))[0])[..., 0]
    folder = tmp_path / "xray12"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), (real.astype(np.uint16) * 16))  # 0-4080 in 16-bit
    source = DataSource(str(folder), "xray", bits=12)
    index = write_shards([source], tmp_path / "out", progress=False)
    (sample,) = list(_read_shard(index.url(index.shards["xray"][0])))
    stored = decode_image_bytes(*_image_of(sample))
    expected = resolve_source(source).load(0)
    assert np.array_equal(stored, expected) and expected.max() > 200  # bright, as read
    plain = decode_image_bytes((folder / "a.png").read_bytes(), "a.png")
    assert plain.max() < 20  # the raw file under the default rule: what the shard held before
