"""MedMIX (and fine-tuning: same datamodule base) resume exactly (issue 26 item 14): the order of
a training epoch depends only on (seed, epoch) and a resumed run skips the batches its
checkpoint trained. Before, the shuffle drew from the global RNG, and after a resume 29 of 303
tensors differed."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.medmix import ODIR, datamodule, medmix, odir_subset

pytestmark = pytest.mark.skipif(not (ODIR / "patients.csv").is_file(), reason="ODIR patients not found")


class Killed(Exception):
    pass


class KillAt(L.Callback):
    """Writes a checkpoint inside the loop after ``step`` optimiser steps, then stops the run
    the hard way (what the pre-emption handler does on SIGTERM, minus the signal)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Killed


def fit(tmp: Path, manifest: Path, epochs: int, ckpt: Path | None = None,
        kill: KillAt | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    model = medmix(tmp / "cache", train_drop_rate=0.3, aux_heads=True, expert_dropout=0.2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp), enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[kill] if kill else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(model, datamodule=datamodule(manifest), ckpt_path=str(ckpt) if ckpt else None)
        except Killed:
            pass
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stopped_and_resumed_medmix_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    manifest = odir_subset(tmp_path)  # 40 training patients, batches of 16: 3 per epoch
    whole = fit(tmp_path, manifest, epochs=3)
    # stopped mid-epoch 1 (after 4 steps: one batch into the second epoch), then resumed
    fit(tmp_path, manifest, epochs=3, kill=KillAt(4, tmp_path / "stopped.ckpt"))
    resumed = fit(tmp_path, manifest, epochs=3, ckpt=tmp_path / "stopped.ckpt")
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert differ == []
    assert int(resumed["images_seen"]) == 3 * 40
    assert any(not torch.equal(v, fit(tmp_path, manifest, epochs=2)[k]) for k, v in whole.items())
