"""What every pre-training datamodule shares: loader settings and the view transform."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from midol.data.loader_utils import batches_trained, check_loader_args, worker_init
from midol.data.pretrain_datasets import ViewCollate
from midol.data.transforms.base import ViewTransform
from midol.data.transforms.multicrop import MultiCropTransform


class ViewDataModule(L.LightningDataModule):
    """Base of :class:`~midol.data.PretrainDataModule` and
    :class:`~midol.data.shards.ShardedPretrainDataModule`: checks the loader settings at
    construction (so bad settings fail when the config is instantiated) and holds the view
    transform, seeded with the datamodule's ``seed``. ``None`` gives the M-IDoL authors' views:
    :class:`~midol.data.transforms.MultiCropTransform` with its defaults (2 global + 6 local
    views, all at 224 px)."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        transform: ViewTransform | None,
        seed: int,
        pin_memory: bool,
        persistent_workers: bool,
        eval_size: int | None,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.transform: ViewTransform = transform if transform is not None else MultiCropTransform()
        if not isinstance(self.transform, ViewTransform):
            raise TypeError(
                f"transform must be a midol.data.transforms.ViewTransform, got "
                f"{type(self.transform).__name__}"
            )
        self.transform.set_base_seed(seed)
        self.eval_size = eval_size if eval_size is not None else self.transform.global_size
        self.collate = ViewCollate(self.transform.num_global)

    def train_loader_kwargs(self) -> dict[str, Any]:
        """The training loader's settings every view datamodule shares (batches of
        ``batch_size``, incomplete ones dropped; resumable mid-epoch via ``batches_done``)."""
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            drop_last=True,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=worker_init,
            batches_done=lambda: batches_trained(self.trainer),
        )

    @property
    def global_size(self) -> int:
        return self.transform.global_size

    @property
    def num_global(self) -> int:
        return self.transform.num_global

    @property
    def num_views(self) -> int:
        return self.transform.num_views
