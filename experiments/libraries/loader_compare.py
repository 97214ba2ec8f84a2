"""Weighted multi-source loading with mid-epoch resume: midol's ``WeightedSourceSampler`` +
``ResumableDataLoader`` (imported read-only) against torchdata's ``StatefulDataLoader`` (same
sampler) and litdata's ``CombinedStreamingDataset(weights=...)`` + ``StreamingDataLoader``.

Corpus: 4 real sources from ../shared/data (chest X-ray, H&E tiles, OCT, fundus; weights
1, 3, 3, 1), each item a JPEG/PNG decoded and resized to 64 px in the workers, plus one random
number drawn in the worker as an "augmentation" (the part of a sample that resume must
reproduce too). Batch 16, 2 workers.

Criteria (the issue's): exact resume (stop after 7 batches, save the loader's state, build a
new loader, load the state: the rest must equal an uninterrupted run, items and augmentation
draws), per-rank disjointness (world size 2: the ranks' draws partition one global order),
throughput (samples/s over the same number of batches).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/loader_compare.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import load_average, need_shared_data  # noqa: E402
from midol.data.sampler import Draw, ResumableDataLoader, WeightedSourceSampler  # noqa: E402

SOURCES = {  # folder under shared/data, glob, how many, weight
    "xray": ("chest_xray/kermany_pneumonia_testsplit_224", "**/*.jpeg", 160, 1.0),
    "pathology": ("histopathology/crc_he_tissue_9class", "**/*.*", 41, 3.0),
    "oct": ("oct/octdl_amd_vid_samples", "**/*.*", 21, 3.0),
    "fundus": ("fundus/odir_disease_eye", "**/*.*", 90, 1.0),
}
BATCH, WORKERS, STOP = 16, 2, 7


def corpus(root: Path) -> tuple[list[Path], list[int], list[float]]:
    files, ids, weights = [], [], []
    for k, (folder, pattern, n, w) in enumerate(SOURCES.values()):
        found = sorted(p for p in (root / folder).glob(pattern)
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))[:n]
        if not found:
            raise SystemExit(f"no images under {root / folder}")
        files += found
        ids += [k] * len(found)
        weights.append(w)
    return files, ids, weights


def decode(data: bytes) -> float:
    import io

    image = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64))
    return float(np.asarray(image, dtype=np.float32).mean())


class Files(torch.utils.data.Dataset):
    """Index (int, or midol's Draw) -> (index, decoded mean, augmentation draw)."""

    def __init__(self, files: list[Path]) -> None:
        self.blobs = [p.read_bytes() for p in files]

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, key: int | Draw) -> tuple[int, float, float]:
        if isinstance(key, Draw):  # midol: the augmentation is seeded from (epoch, position)
            g = torch.Generator().manual_seed(key.epoch * 1_000_003 + key.position)
            aug = float(torch.rand(1, generator=g))
            index = key.index
        else:  # a plain dataset: the worker's RNG, whose state the loader must restore
            aug = float(torch.rand(1))
            index = int(key)
        return index, decode(self.blobs[index]), aug


def flat(batches: list[Any]) -> list[tuple[int, float]]:
    out = []
    for idx, _, aug in batches:
        out += list(zip([int(i) for i in idx], [round(float(a), 7) for a in aug]))
    return out


def take(loader: Any, n: int | None = None) -> list[Any]:
    out = []
    for b, batch in enumerate(loader):
        if n is not None and b >= n:
            break
        out.append(batch)
    return out


# ------------------------------------------------------------------------------ midol
def midol_loader(ds: Files, ids: list[int], weights: list[float], rank: int | None = None,
                 done: list[int] | None = None) -> ResumableDataLoader:
    sampler: Any = WeightedSourceSampler(ids, weights, seed=0)
    if rank is not None:
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

        sampler = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
    counter = done if done is not None else [0]
    return ResumableDataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=WORKERS,
                               batches_done=lambda: counter[0])


def midol_run(ds: Files, ids: list[int], weights: list[float]) -> dict[str, Any]:
    start = time.perf_counter()
    full = take(midol_loader(ds, ids, weights))
    seconds = time.perf_counter() - start
    done = [0]
    first = midol_loader(ds, ids, weights, done=done)
    head = []
    for batch in first:
        head.append(batch)
        done[0] += 1  # Lightning's counter of trained batches
        if done[0] == STOP:
            break
    state = first.state_dict()
    resumed = midol_loader(ds, ids, weights)
    resumed.load_state_dict(state)
    rest = take(resumed)
    ranks = [flat(take(midol_loader(ds, ids, weights, rank=r))) for r in (0, 1)]
    return {"full": flat(full), "resumed": flat(head) + flat(rest), "ranks": ranks,
            "seconds": seconds, "samples": sum(len(b[0]) for b in full)}


# ------------------------------------------------------------------------------ torchdata
class StatefulFiles(Files):
    """The dataset keeps its worker's RNG state in ``state_dict`` (torchdata's Stateful
    protocol), so StatefulDataLoader can restore the augmentation stream too."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["rng"])


def torchdata_loader(ds: Files, ids: list[int], weights: list[float], rank: int | None = None) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    sampler: Any = WeightedSourceSampler(ids, weights, seed=0)
    if rank is not None:
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

        sampler = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
    return StatefulDataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=WORKERS,
                              generator=torch.Generator().manual_seed(0))


def torchdata_run(ds: Files, ids: list[int], weights: list[float]) -> dict[str, Any]:
    start = time.perf_counter()
    full = take(torchdata_loader(ds, ids, weights))
    seconds = time.perf_counter() - start
    first = torchdata_loader(ds, ids, weights)
    head, it = [], iter(first)
    for _ in range(STOP):
        head.append(next(it))
    state = first.state_dict()
    del it
    resumed = torchdata_loader(ds, ids, weights)
    resumed.load_state_dict(state)
    rest = take(resumed)
    ranks = [flat(take(torchdata_loader(ds, ids, weights, rank=r))) for r in (0, 1)]
    return {"full": flat(full), "resumed": flat(head) + flat(rest), "ranks": ranks,
            "seconds": seconds, "samples": sum(len(b[0]) for b in full)}


# ------------------------------------------------------------------------------ litdata
def _item(arg: tuple[int, str]) -> dict[str, Any]:
    index, path = arg
    return {"index": index, "data": Path(path).read_bytes()}


class Decoded:
    """litdata item -> (index, decoded mean, augmentation draw from the worker's RNG)."""

    def __call__(self, item: dict[str, Any]) -> tuple[int, float, float]:
        return int(item["index"]), decode(item["data"]), float(torch.rand(1))


def litdata_write(files: list[Path], ids: list[int], work: Path) -> tuple[list[str], float]:
    from litdata import optimize

    dirs = []
    start = time.perf_counter()
    for k in range(len(SOURCES)):
        out = work / f"source{k}"
        items = [(i, str(p)) for i, (p, s) in enumerate(zip(files, ids)) if s == k]
        optimize(fn=_item, inputs=items, output_dir=str(out), chunk_size=4, num_workers=1,
                 verbose=False)
        dirs.append(str(out))
    return dirs, time.perf_counter() - start


def _decoded_stream_class() -> type:
    from litdata import StreamingDataset

    class DecodedStream(StreamingDataset):
        def __getitem__(self, index: Any) -> Any:
            return Decoded()(super().__getitem__(index))

    DecodedStream.__qualname__ = DecodedStream.__name__ = "DecodedStream"
    return DecodedStream


try:  # module level, so workers can unpickle it
    DecodedStream = _decoded_stream_class()
except ImportError:  # litdata not installed: its section records the error
    DecodedStream = None  # type: ignore[assignment,misc]


def litdata_loader(dirs: list[str], shares: list[float]) -> Any:
    from litdata import CombinedStreamingDataset, StreamingDataLoader

    datasets = [DecodedStream(d, shuffle=True, seed=0) for d in dirs]
    combined = CombinedStreamingDataset(datasets, seed=0, weights=shares, iterate_over_all=False)
    return StreamingDataLoader(combined, batch_size=BATCH, num_workers=WORKERS)


def litdata_run(files: list[Path], ids: list[int], weights: list[float], n_batches: int,
                work: Path) -> dict[str, Any]:
    dirs, write_s = litdata_write(files, ids, work)
    counts = np.bincount(ids)
    shares = list(np.array(weights) * counts / (np.array(weights) * counts).sum())
    start = time.perf_counter()
    full = take(litdata_loader(dirs, shares), n_batches)
    seconds = time.perf_counter() - start
    again = take(litdata_loader(dirs, shares), n_batches)
    first = litdata_loader(dirs, shares)
    head, it = [], iter(first)
    for _ in range(STOP):
        head.append(next(it))
    state = first.state_dict()
    del it
    resumed = litdata_loader(dirs, shares)
    resumed.load_state_dict(state)
    rest = take(resumed, n_batches - STOP)
    return {"full": flat(full), "again": flat(again), "resumed": flat(head) + flat(rest), "seconds": seconds,
            "samples": sum(len(b[0]) for b in full), "write_s": write_s, "dirs": dirs,
            "shares": shares}


def litdata_rank(rank: int, dirs: list[str], shares: list[float], n_batches: int, out: str) -> None:
    """One rank of a 2-process gloo group: litdata reads the world size from torch.distributed."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = flat(take(litdata_loader(dirs, shares), n_batches))
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def partition(ranks: list[list[tuple[int, float]]], full_indices: list[int]) -> dict[str, Any]:
    """Do the ranks' draws deal one global order out (entry k*2+r to rank r)?"""
    a, b = [i for i, _ in ranks[0]], [i for i, _ in ranks[1]]
    interleaved = [x for pair in zip(a, b) for x in pair]
    return {"rank_sizes": [len(a), len(b)],
            "deal_global_order": interleaved == full_indices[:len(interleaved)],
            "shared_indices": len(set(a) & set(b))}


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    root = need_shared_data()
    files, ids, weights = corpus(root)
    ds = Files(files)
    report: dict[str, Any] = {"load_before": load_average(), "items": len(files),
                              "per_source": np.bincount(ids).tolist(), "weights": weights}
    mid = midol_run(ds, ids, weights)
    n_batches = len(mid["full"]) // BATCH
    report["midol"] = {
        "exact_resume": mid["resumed"] == mid["full"],
        "samples_per_s": mid["samples"] / mid["seconds"],
        **partition(mid["ranks"], [i for i, _ in mid["full"]]),
    }
    # uniform weights: a permutation, so the ranks' items must be disjoint sets
    uni = [flat(take(midol_loader(ds, ids, [1.0] * 4, rank=r))) for r in (0, 1)]
    report["midol"]["uniform_shared_indices"] = len({i for i, _ in uni[0]} & {i for i, _ in uni[1]})
    try:
        td = torchdata_run(ds, ids, weights)
        report["torchdata"] = {
            "exact_resume_items": [i for i, _ in td["resumed"]] == [i for i, _ in td["full"]],
            "exact_resume_with_augmentation": td["resumed"] == td["full"],
            "samples_per_s": td["samples"] / td["seconds"],
            **partition(td["ranks"], [i for i, _ in td["full"]]),
        }
    except Exception as err:  # noqa: BLE001 - the report records a library's failure
        report["torchdata"] = {"error": f"{type(err).__name__}: {err}"}
    try:
        tds = torchdata_run(StatefulFiles(files), ids, weights)
        report["torchdata_stateful_dataset"] = {
            "exact_resume_with_augmentation": tds["resumed"] == tds["full"],
            "samples_per_s": tds["samples"] / tds["seconds"]}
    except Exception as err:  # noqa: BLE001
        report["torchdata_stateful_dataset"] = {"error": f"{type(err).__name__}: {err}"}
    with tempfile.TemporaryDirectory(prefix="litdata_") as work:
        try:
            lit = litdata_run(files, ids, weights, n_batches, Path(work))
            idx = [i for i, _ in lit["full"]]
            shares_seen = np.bincount([ids[i] for i in idx], minlength=4) / len(idx)
            report["litdata"] = {
                "fresh_runs_equal_items": [i for i, _ in lit["again"]] == idx,
                "samples_first_pass": len(idx),
                "exact_resume_items": [i for i, _ in lit["resumed"]] == idx,
                "exact_resume_with_augmentation": lit["resumed"] == lit["full"],
                "resume_first_mismatch": next((k for k, (x, y) in enumerate(zip(lit["resumed"], lit["full"]))
                                               if x != y), None),
                "samples_per_s": lit["samples"] / lit["seconds"], "write_s": lit["write_s"],
                "shares_expected": [round(s, 3) for s in lit["shares"]],
                "shares_seen": [round(float(s), 3) for s in shares_seen],
                "repeats_in_one_pass": len(idx) - len(set(idx)),
            }
            import torch.multiprocessing as mp

            mp.spawn(litdata_rank, args=(lit["dirs"], lit["shares"], n_batches // 2, work), nprocs=2)
            ranks = [json.loads(Path(work, f"rank{r}.json").read_text()) for r in (0, 1)]
            a, b = {i for i, _ in ranks[0]}, {i for i, _ in ranks[1]}
            report["litdata"]["ranks"] = {"rank_sizes": [len(ranks[0]), len(ranks[1])],
                                          "shared_indices": len(a & b)}
        except Exception as err:  # noqa: BLE001
            report.setdefault("litdata", {})["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    report["load_after"] = load_average()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
