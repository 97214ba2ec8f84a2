"""Checks that need a CUDA GPU; skipped (with the reason) everywhere else. On a GPU machine
``make test`` runs them: bf16-mixed pre-training on the device, Sinkhorn in float32 under bf16
autocast, and the fused optimiser."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from midol.losses import sinkhorn_knopp
from tests.helpers.tiny import tiny_datamodule, tiny_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sinkhorn_is_float32_under_bf16_autocast_and_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    scaled = (torch.randn(64, 5, generator=g) * 3 / 0.04).to(torch.bfloat16)  # bf16 router logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        probs = sinkhorn_knopp(scaled.cuda())
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64, device="cuda"))
    # float32 inside: the values of the CPU computation on the same bf16 input
    torch.testing.assert_close(probs.cpu(), sinkhorn_knopp(scaled), rtol=1e-3, atol=1e-5)


def test_bf16_mixed_fit_on_the_gpu_trains_with_the_fused_optimiser():
    L.seed_everything(0)
    module = tiny_module()
    before = copy.deepcopy(module.teacher.state_dict())
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, tiny_datamodule())
    assert trainer.global_step == 3
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/l_route", "train/l_cst"):
        assert torch.isfinite(logged[key]), key
    moved = [k for k, v in module.teacher.state_dict().items()
             if v.is_floating_point() and not torch.equal(v.cpu(), before[k])]
    assert moved, "the EMA teacher did not change on the GPU"
    assert int(module.images_seen) == 3 * 8
