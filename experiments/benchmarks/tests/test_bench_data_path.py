"""The data-path benchmarks compare like with like: every decoder of bench_decode gives the
image Pillow gives (reduce-on-decode ones: at least the view's side), and bench_shards' "before"
read path keeps exactly the samples the offsets path reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.benchmarks import bench_decode, bench_shards
from midol.data import DataSource
from midol.data.shards import write_shards

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (real images) absent")


@needs_shared
def test_decoders_agree_with_pillow() -> None:
    jpg = sorted((SHARED / "fundus/odir_disease_eye").rglob("*.jpg"))[0].read_bytes()  # 512 px
    png = sorted((SHARED / "histopathology/crc_he_tissue_9class").rglob("*.png"))[0].read_bytes()
    decoders = {**bench_decode.pil_decoders(256), **bench_decode.other_decoders(256)}
    reference = decoders["Pillow"](jpg)
    assert reference.shape == (512, 512, 3)
    for name, decode in decoders.items():
        if bench_decode.applies(name, "JPEG 512x512", 256):
            image = decode(jpg)
            if image.shape == reference.shape:  # full size: the same libjpeg-turbo IDCT or close
                assert np.abs(image.astype(int) - reference).mean() < 1.0, name
            else:  # DCT-scaled to half (>= 256 on both sides), close to a 2x2 mean of the full
                assert image.shape == (256, 256, 3), name
                half = reference.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
                assert np.abs(image - half).mean() < 3.0, name
        if bench_decode.applies(name, "PNG 224x224", 256):
            assert np.array_equal(decode(png), decoders["Pillow"](png)), name  # lossless


@needs_shared
def test_old_and_new_slot_passes_keep_the_same_samples(tmp_path: Path) -> None:
    index = write_shards([DataSource(str(SHARED / "dermoscopy/isic_9class_180px"), "derm")],
                         tmp_path, shard_size=200, progress=False)
    urls = [index.url(s) for s in index.shards["derm"]]
    counts = index.counts["derm"]
    offsets = [index.sample_offsets("derm", i) for i in range(len(urls))]
    assert counts == [200, 200, 140]
    for slots in (4, 16):
        kept = [bench_shards.new_slot_pass(urls, counts, offsets, s, slots)  # type: ignore[arg-type]
                for s in range(slots)]
        assert sorted(k for part in kept for k in part) == [f"{k:09d}" for k in range(540)]
        assert kept == [bench_shards.old_slot_pass(urls, counts, s, slots) for s in range(slots)]
