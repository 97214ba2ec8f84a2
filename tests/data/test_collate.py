"""The pre-training collate: same batch as a plain stack, and stacked into shared memory inside a
DataLoader worker (issue 30 item 3: no second copy of each batch on its way to the main process)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from midol.data.pretrain_datasets import ViewCollate


class _Views(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        views = [torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=g) for s in (16, 16, 8)]
        return {"views": views, "modality": i % 2, "index": i, "skipped": []}


def _plain(items: list[dict]) -> list[torch.Tensor]:
    return [torch.stack([b["views"][v] for b in items]) for v in range(3)]


def test_collate_equals_a_plain_stack_in_the_main_process() -> None:
    items = [_Views()[i] for i in range(3)]
    batch = ViewCollate(num_global=2)(items)
    for got, want in zip(batch["views"], _plain(items), strict=True):
        assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert batch["modality"].tolist() == [0, 1, 0] and batch["index"].tolist() == [0, 1, 2]


class _Probe:
    """Reports, from inside the worker, whether the collated views were born shared (every
    tensor arrives shared in the main process either way: the loader's pickler moves it there,
    which is the extra copy this avoids)."""

    def __init__(self) -> None:
        self.collate = ViewCollate(num_global=2)

    def __call__(self, items: list[dict]) -> tuple[dict, list[bool]]:
        batch = self.collate(items)
        return batch, [v.is_shared() for v in batch["views"]]


def test_collate_writes_views_into_shared_memory_in_a_worker() -> None:
    loader = DataLoader(_Views(), batch_size=3, num_workers=1, collate_fn=_Probe())
    for k, (batch, born_shared) in enumerate(loader):
        assert born_shared == [True, True, True]
        items = [_Views()[i] for i in range(3 * k, 3 * k + 3)]
        for got, want in zip(batch["views"], _plain(items), strict=True):
            assert torch.equal(got, want)
