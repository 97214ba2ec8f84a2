"""Collate into shared memory vs a plain stack, in a one-worker DataLoader (issue 30 item 3).

A pre-training batch of 64 images x (2 global 224 px + 10 local 96 px) uint8 views, the size
the Swin-B presets move. Prints milliseconds per batch in the main process, interleaved.

Run: OMP_NUM_THREADS=1 python experiments/benchmarks/bench_collate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

VIEWS = [224] * 2 + [96] * 10
BATCH = 64


class _Views(Dataset):
    def __init__(self) -> None:
        self.views = [torch.randint(0, 256, (3, s, s), dtype=torch.uint8) for s in VIEWS]

    def __len__(self) -> int:
        return BATCH * 12

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"views": [v.clone() for v in self.views]}


def plain(batch: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [torch.stack([b["views"][v] for b in batch]) for v in range(len(VIEWS))]


def shared(batch: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [default_collate([b["views"][v] for b in batch]) for v in range(len(VIEWS))]


def ms_per_batch(collate: Callable[[list[dict[str, Any]]], list[torch.Tensor]]) -> float:
    loader = DataLoader(_Views(), batch_size=BATCH, num_workers=1, collate_fn=collate, prefetch_factor=2)
    start, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for rep in range(args.repeats):
        for name, fn in (("plain stack", plain), ("shared memory", shared)):
            print(f"repeat {rep}: {name}: {ms_per_batch(fn):.1f} ms/batch")


if __name__ == "__main__":
    main()
