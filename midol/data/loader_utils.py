"""What every midol DataLoader shares: the worker initialiser and the trained-batches count."""

from __future__ import annotations

from typing import Any

import cv2
from torch.utils.data import get_worker_info


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of every midol loader.

    No OpenCV thread pool per worker (the workers are the parallelism), and a transform with a
    ``set_seed`` gets the worker's own seed: albumentations ignores numpy/torch seeds, so without
    this every worker would draw the same augmentations (``info.seed`` differs per worker and
    derives from the main process's torch seed). Datasets that reseed per sample override it.
    """
    cv2.setNumThreads(0)
    info = get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "transform", None)
    reseed = getattr(transform, "set_seed", None)
    if info is not None and callable(reseed):
        reseed(info.seed % 2**32)


def batches_trained(trainer: Any) -> int:
    """Batches of the current epoch whose training step has finished (Lightning's count, which
    checkpoints store so that a resumed run skips them); 0 outside a Trainer.

    At the end of an epoch (also one cut short by ``limit_train_batches``) the whole epoch
    counts as done, so a checkpoint written there resumes at the next epoch."""
    if trainer is None:
        return 0
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    if done >= trainer.num_training_batches:
        return max(done, len(trainer.train_dataloader))
    return done


def check_loader_args(batch_size: int, num_workers: int) -> None:
    """One-line errors for a batch size below 1 or a negative worker count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
