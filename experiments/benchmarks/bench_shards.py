"""Shards against plain folders, and the read amplification of small modalities (issue 30,
item 3).

    taskset -c 1 python experiments/benchmarks/bench_shards.py \\
        --out experiments/results/shards_2026-12-08.md

A. Images/s decoded and transformed (the DEX view, ``SingleViewTransform(256)``) by one
   process, one thread, for the same real images from ``../shared/data`` read as a folder
   (``PretrainDataset`` over a ``DataSource``: open, read, decode, transform) and as shards
   (``ShardStream`` over ``write_shards`` output, one modality at a time: tar read, decode,
   transform; and as before this change, whole shards through webdataset's ``tarfile``).
   All read a warm page cache on a local disk. Images per CPU second of the process
   (``time.process_time``: other processes on shared cores do not lower it); best of
   ``--rounds`` rounds, taking turns.
B. Read amplification: a modality in fewer shards than data-loading slots (GPUs x workers).
   CPU time (``time.process_time``) of one slot's pass over its own samples, per sample it
   keeps, at ``--slots`` simulated slots: before (every slot reads every shard in full through
   webdataset and keeps one sample in ``slots``, restated here as the old code did it) and now
   (``_read_samples``: a seek to each of its samples through ``<shard>.offsets.npy``). Bytes
   read per slot beside it. Best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, markdown_table, publish, python_command  # noqa: E402

from midol.data import DataSource  # noqa: E402
from midol.data.pretrain_datasets import PretrainDataset  # noqa: E402
from midol.data.sampler import Draw  # noqa: E402
from midol.data.shards import ShardStream, write_shards  # noqa: E402
from midol.data.shards.index import scan_sample_offsets  # noqa: E402
from midol.data.shards.stream import _read_samples, _read_shard  # noqa: E402
from midol.data.transforms import SingleViewTransform  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
# (modality, folder under ../shared/data): JPEG and PNG sources of several sizes
SETS = [
    ("fundus512", "fundus/odir_disease_eye"),
    ("derm766", "dermoscopy/ph2_lesion/images"),
    ("xray224", "chest_xray/kermany_pneumonia_testsplit_224"),
    ("pathology224", "histopathology/crc_he_tissue_9class"),
    ("xray64png", "chest_xray/nih_normal_abnormal_64px"),
]
AMPLIFICATION_SET = ("fundus256", "fundus/odir_patients")  # 3,000 JPEGs of 13 kB


def folders_vs_shards(root: Path, work: Path, rounds: int, size: int,
                      min_images: int) -> list[list[str]]:
    sources = [DataSource(str(root / folder), m) for m, folder in SETS]
    index = write_shards(sources, work / "shards", shard_size=1000, progress=False)
    view = SingleViewTransform(size=size, seed=0)
    best: dict[tuple[str, str], float] = {}
    counts = {m: index.num_samples(m) for m in index.modalities}
    # a timed pass covers at least min_images (small sets are gone through several times)
    passes = {m: -(-min_images // counts[m]) for m in index.modalities}
    for _ in range(rounds):
        for m, source in zip(index.modalities, sources):
            n = counts[m] * passes[m]
            folder = PretrainDataset([source], view)
            t0 = time.process_time()
            for i in range(n):  # as ResumableDataLoader hands items over: seeded by a Draw
                folder[Draw(i % counts[m], 0, i)]
            t1 = time.process_time()
            weights = {k: float(k == m) for k in index.modalities}
            times = [t1 - t0]
            for cls in (ShardStream, TarfileStream):
                stream = cls(index, view, weights, batch_size=n, batches_per_epoch=1, seed=0,
                             shuffle_buffer=0)
                t = time.process_time()
                assert sum(1 for _ in stream) == n
                times.append(time.process_time() - t)
            for kind, dt in zip(("folder", "shards", "tarfile"), times):
                best[(m, kind)] = min(best.get((m, kind), float("inf")), dt)
    rows = []
    kinds = ("folder", "shards", "tarfile")
    total = dict.fromkeys(kinds, 0.0)
    for m, folder_name in SETS:
        for kind in kinds:  # the corpus once: each set's time per image x its size
            total[kind] += best[(m, kind)] / passes[m]
        rows.append(_row(f"{folder_name} ({counts[m]} x {passes[m]})", counts[m] * passes[m],
                         [best[(m, kind)] for kind in kinds]))
    rows.append(_row(f"all, once each ({sum(counts.values())})", sum(counts.values()),
                     [total[kind] for kind in kinds]))
    return rows


def _row(label: str, n: int, times: list[float]) -> list[str]:
    folder, shards, tar = (n / t for t in times)
    return [label, f"{folder:.0f}", f"{shards:.0f}", f"{shards / folder:.2f}", f"{tar:.0f}",
            f"{tar / folder:.2f}"]


class TarfileStream(ShardStream):
    """The read path before: whole shards through webdataset (Python's tarfile)."""

    def _offsets(self, modality: str, i: int, scan: bool) -> np.ndarray | None:
        return None


def old_slot_pass(urls: list[str], counts: list[int], slot: int, slots: int) -> list[str]:
    """The read path before this change: every shard in full, keeping one sample in slots.
    Returns the keys of the samples kept."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    kept = []
    for url, first in zip(urls, starts):
        for k, sample in enumerate(_read_shard(url)):
            if (first + k) % slots == slot:
                kept.append(sample["__key__"])
    return kept


def new_slot_pass(urls: list[str], counts: list[int], offsets: list[np.ndarray], slot: int,
                  slots: int) -> list[str]:
    """Now: a seek to each of the slot's samples through the offsets."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    kept = []
    for url, first, n, off in zip(urls, starts, counts, offsets):
        picks = range((slot - int(first)) % slots, n, slots)
        kept += [sample["__key__"] for sample in _read_samples(url, off, picks)]
    return kept


def amplification(root: Path, work: Path, rounds: int, slot_counts: list[int],
                  shard_size: int) -> tuple[list[list[str]], str]:
    m, folder = AMPLIFICATION_SET
    index = write_shards([DataSource(str(root / folder), m)], work / "amp",
                         shard_size=shard_size, progress=False)
    urls = [index.url(s) for s in index.shards[m]]
    counts = index.counts[m]
    offsets = [index.sample_offsets(m, i) for i in range(len(urls))]
    assert all(o is not None for o in offsets)
    total_bytes = sum(os.path.getsize(u) for u in urls)
    rows = []
    for slots in slot_counts:
        slot = slots // 2  # a slot in the middle: all slots cost alike
        best = {"old": float("inf"), "new": float("inf")}
        kept: list[str] = []
        for _ in range(rounds):
            t0 = time.process_time()
            kept_old = old_slot_pass(urls, counts, slot, slots)
            t1 = time.process_time()
            kept = new_slot_pass(urls, counts, offsets, slot, slots)  # type: ignore[arg-type]
            t2 = time.process_time()
            assert kept == kept_old
            best["old"] = min(best["old"], t1 - t0)
            best["new"] = min(best["new"], t2 - t1)
        new_bytes = sum(int(o[k + 1] - o[k]) for o, first, n in  # type: ignore[index]
                        zip(offsets, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
                        for k in range((slot - int(first)) % slots, n, slots))
        rows.append([str(slots), str(len(kept)), f"{1e3 * best['old'] / len(kept):.2f}",
                     f"{1e3 * best['new'] / len(kept):.3f}", f"{best['old'] / best['new']:.0f}x",
                     f"{total_bytes / 2**20:.1f}", f"{new_bytes / 2**20:.2f}"])
    t0 = time.process_time()
    for u in urls:
        scan_sample_offsets(u)
    scan_ms = 1e3 * (time.process_time() - t0) / len(urls)
    note = (f"{sum(counts)} samples of {folder} in {len(urls)} shard(s) of {shard_size}; "
            f"scanning one shard's tar headers (old shards without offsets, once per worker): "
            f"{scan_ms:.1f} ms CPU")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="DEX view side")
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--amp-shard-size", type=int, default=1000)
    parser.add_argument("--min-images", type=int, default=300, help="images per timed pass")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    lines = header("Shards vs folders, and read amplification", torch.device("cpu"),
                   python_command())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows_a = folders_vs_shards(args.data, work, args.rounds, args.size, args.min_images)
        rows_b, note = amplification(args.data, work, args.rounds, args.slots,
                                     args.amp_shard_size)
    lines += ["## A. Shards vs folders (decode + DEX view, one thread)", "",
              "* images per CPU second of the process (process_time); "
              f"best of {args.rounds} interleaved rounds; images from {args.data}; shards of "
              "1000 (one per set), written without re-encoding; no shuffle buffer (steady state); "
              "warm page cache, local disk", ""]
    lines += markdown_table(["images", "folder img/s", "shards img/s", "shards / folder",
                             "before: shards via tarfile img/s", "before / folder"], rows_a)
    lines += ["", "## B. Read amplification of a modality in fewer shards than slots", "",
              f"* {note}; CPU time of one slot's pass over its samples, best of {args.rounds}",
              ""]
    lines += markdown_table(["slots (GPUs x workers)", "samples kept by the slot",
                             "before: CPU ms per kept sample", "now: CPU ms per kept sample",
                             "saved", "before: MiB read per slot", "now: MiB read per slot"],
                            rows_b)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
