"""Write a resumable checkpoint when the job is told to stop (SIGTERM: SLURM pre-emption, kill)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, save a checkpoint before the process exits.

    Lightning turns SIGTERM into a flag, lets the current batch finish (under DDP all ranks
    stop at the same batch) and raises ``SIGTERMException``; this callback then writes
    ``dirpath/filename.ckpt`` (rank 0 writes, all ranks take part). The defaults put it at
    ``last.ckpt`` of the first ``ModelCheckpoint``, so ``midol fit ... --ckpt_path last``
    resumes from it, at the exact batch. The process then exits with status 143 (128 + SIGTERM):
    the run did not finish, so end-of-fit callbacks (export, summary) do not run.

    Only SIGTERM: Ctrl-C (SIGINT) can interrupt an optimiser step half-way, so its state is
    not saved; stop a run cleanly with ``kill -TERM <pid>``.

    Args:
        dirpath: folder of the checkpoint; default: the first ``ModelCheckpoint``'s folder,
            else ``<trainer.default_root_dir>/checkpoints``.
        filename: file name without ``.ckpt``; the default ``last`` is what
            ``ckpt_path="last"`` looks for.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last") -> None:
        if not filename or filename.endswith(".ckpt"):
            raise ValueError(f"filename must be a non-empty name without .ckpt, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: Path | None = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint goes for ``trainer`` (see ``dirpath``)."""
        folder = self.dirpath
        if folder is None:
            folder = next(
                (cb.dirpath for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.dirpath),
                os.path.join(trainer.default_root_dir, "checkpoints"),
            )
        return Path(folder) / f"{self.filename}.ckpt"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()  # save_last="link": replace the link, not the file it points to
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimiser, loops, data
        self.saved_path = path
        # Lightning exits with status 0 here (SIGTERMException is a SystemExit without code);
        # 128 + 15, the shell's code for "terminated by SIGTERM", stops `midol fit && ...` chains.
        exception.code = 128 + signal.SIGTERM
        loop = trainer.fit_loop.epoch_loop
        rank_zero_warn(
            f"SIGTERM received: checkpoint written to {path} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, {loop.batch_progress.current.processed} batches "
            "into it). Resume with the same command plus --ckpt_path last (or this file)."
        )
