"""How long training waits for its data, and how many loader workers would end the wait.

A run is *data-bound* when the loader delivers batches more slowly than the model consumes
them: the time between the end of one training step and the start of the next (fetching the
batch and moving it to the device) is then a large part of the step time. With ``W`` workers
each producing a batch in ``t_w`` seconds, a data-bound step takes ``t_w / W``; the model alone
needs ``(1 - f)`` of that, where ``f`` is the waiting fraction, so ``W / (1 - f)`` workers would
feed it (issue 30 item 3: loader sizing for a compiled run is derived, not guessed).

The times are the host's: on a GPU the device may still run queued work while the host waits,
so ``f`` is an upper bound there; midol's presets read one flag back per step (non-finite check
one step late), which keeps the host at most one step ahead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


def workers_needed(num_workers: int, wait_fraction: float) -> int:
    """Loader workers that would end a wait of ``wait_fraction`` of the step time (see the
    module docstring); at least one more than now while there is a wait."""
    if not 0 <= wait_fraction < 1:
        raise ValueError(f"wait_fraction must lie in [0, 1), got {wait_fraction}")
    if num_workers == 0:
        return 1 if wait_fraction > 0 else 0  # the main process decodes: any worker helps
    return max(num_workers + (wait_fraction > 0), math.ceil(num_workers / (1 - wait_fraction)))


class DataWaitMonitor(L.Callback):
    """Logs the fraction of training time spent waiting for batches (``perf/data_wait``) and
    images per second (``perf/images_per_s``), and warns once when the wait stays above
    ``warn_fraction`` over a window, naming the worker count that would feed the model.

    Args:
        window: training steps per measurement (the first window after each epoch start is
            skipped: workers start and fill their prefetch queues then).
        warn_fraction: warn when the waiting fraction of a window is above this (0 < x < 1).
    """

    clock: Callable[[], float] = staticmethod(time.perf_counter)  # tests set a fake one

    def __init__(self, window: int = 50, warn_fraction: float = 0.1) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 < warn_fraction < 1:
            raise ValueError(f"warn_fraction must lie in (0, 1), got {warn_fraction}")
        self.window = window
        self.warn_fraction = warn_fraction
        self.warned = False
        self.last_fraction: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._end: float | None = None
        self._start = 0.0
        self._wait = self._busy = 0.0
        self._steps = self._images = 0
        self._skip = self.window

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._start = self.clock()
        if self._end is not None and self._skip == 0:
            self._wait += self._start - self._end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._end = self.clock()
        if self._skip > 0:
            self._skip -= 1
            return
        self._busy += self._end - self._start
        self._steps += 1
        self._images += _batch_images(batch)
        if self._steps >= self.window:
            self._report(trainer, pl_module)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self._wait + self._busy
        fraction = self._wait / total if total > 0 else 0.0
        self.last_fraction = fraction
        pl_module.log("perf/data_wait", fraction, on_step=True, on_epoch=False, rank_zero_only=True)
        if self._images and total > 0:
            pl_module.log("perf/images_per_s", self._images / total, on_step=True, on_epoch=False,
                          rank_zero_only=True)
        if fraction > self.warn_fraction and not self.warned:
            self.warned = True
            workers = int(getattr(trainer.train_dataloader, "num_workers", 0) or 0)
            rank_zero_warn(
                f"training waited for data {fraction:.0%} of the time over {self._steps} steps "
                f"with {workers} loader worker(s): the run is data-bound; about "
                f"{workers_needed(workers, min(fraction, 0.99))} worker(s) would feed the model "
                "(data.init_args.num_workers), or pre-shrink the images (midol shard --max-side)")
        self._wait = self._busy = 0.0
        self._steps = self._images = 0


def _batch_images(batch: Any) -> int:
    """Source images in a batch: the first tensor's leading size (a view batch's first view)."""
    if isinstance(batch, dict):
        batch = batch.get("views", batch.get("image", next(iter(batch.values()), None)))
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0
