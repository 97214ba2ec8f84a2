"""What every pre-training datamodule shares: batch and worker settings and the multi-crop views."""

from __future__ import annotations

import lightning as L

from midol.data.transforms import MultiCropTransform


class MultiCropDataModule(L.LightningDataModule):
    """Base of :class:`~midol.data.PretrainDataModule` and
    :class:`~midol.data.ShardedPretrainDataModule`: checks the loader settings and builds the
    :class:`MultiCropTransform` at construction, so bad view settings fail when the config is
    instantiated. The pre-training module reads ``num_global`` from here."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        global_size: int,
        local_size: int,
        num_global: int,
        num_local: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        seed: int,
        pin_memory: bool,
        persistent_workers: bool,
        eval_size: int | None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.global_size = global_size
        self.eval_size = eval_size if eval_size is not None else global_size
        self.transform = MultiCropTransform(
            global_size=global_size, local_size=local_size, num_global=num_global,
            num_local=num_local, global_scale=global_scale, local_scale=local_scale, seed=seed,
        )

    @property
    def num_global(self) -> int:
        return self.transform.num_global

    @property
    def num_local(self) -> int:
        return self.transform.num_local

    @property
    def num_views(self) -> int:
        return self.transform.num_views
