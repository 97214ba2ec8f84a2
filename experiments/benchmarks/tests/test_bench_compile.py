"""The ``compile`` option of PretrainModule: both backbones compiled once the Trainer sets the
model up, checkpoint keys unchanged, and (slow, CPU inductor) the same losses as eager."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from tests.helpers.tiny import TINY_SWIN, tiny_datamodule, tiny_module  # noqa: E402


def test_compile_wraps_both_backbones_and_keeps_checkpoint_keys() -> None:
    plain = tiny_module()
    compiled = tiny_module(compile=True)
    assert compiled.hparams.compile is True and plain.hparams.compile is False
    plain.configure_model()
    assert getattr(plain.student["backbone"], "_compiled_call_impl", None) is None
    compiled.configure_model()
    impls = [compiled.student["backbone"]._compiled_call_impl,
             compiled.teacher["backbone"]._compiled_call_impl]
    assert all(impl is not None for impl in impls)
    compiled.configure_model()  # Lightning calls it for every fit/validate: no re-wrapping
    assert compiled.student["backbone"]._compiled_call_impl is impls[0]
    assert list(compiled.state_dict()) == list(plain.state_dict())


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(compile: bool) -> list[float]:
    torch.manual_seed(0)
    module = tiny_module(compile=compile, backbone_kwargs={**TINY_SWIN, "drop_path_rate": 0.0})
    rec = _Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, tiny_datamodule())
    return rec.losses


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_training_matches_eager() -> None:
    eager, compiled = _fit(False), _fit(True)
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
