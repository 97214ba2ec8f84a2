"""Speed switches (issue 12): the memory rule picks checkpointing as documented, and neither
checkpointing nor fused attention changes the loss or the gradients."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from midol.models import build_backbone
from midol.models.speed_switches import MARGIN, estimate_memory, set_fused_attention
from tests.helpers.tiny import TINY_SWIN, tiny_datamodule, tiny_module

SWIN_B = "swin_base_patch4_window7_224"
DINO_VIEWS = [224] * 2 + [96] * 6
AUTHORS_VIEWS = [224] * 8
# Swin-B + the 5-expert, 65536-d projector: ~175 M trainable, the same frozen in the teacher.
PARAMS = dict(trainable_params=175_000_000, frozen_params=175_000_000)
# total_memory as torch reports it, in GiB: a 24 GB card, H100 80 GB, a 96 GB card, H200.
GB24, H100, GB96, H200 = 22.1, 79.1, 89.4, 139.8


def _plan(views: list[int], device_gib: float) -> bool:
    estimate = estimate_memory(SWIN_B, 64, views, device_gib=device_gib, **PARAMS)
    assert estimate is not None
    return estimate.checkpointing


def test_memory_rule_matches_the_documented_rule() -> None:
    # DINO views (96 px locals): off on 80 GB and up, on at 24 GB.
    assert [_plan(DINO_VIEWS, g) for g in (GB24, H100, GB96, H200)] == [True, False, False, False]
    # All views at 224 px (the authors' setting): on at 80 GB, off from 96 GB.
    assert [_plan(AUTHORS_VIEWS, g) for g in (GB24, H100, GB96, H200)] == [True, True, False, False]


def test_memory_estimate_restates_its_formula() -> None:
    e = estimate_memory(SWIN_B, 64, DINO_VIEWS, device_gib=H200, **PARAMS)
    assert e is not None
    views = 2 + 6 * (96 / 224) ** 2
    assert e.activations_gib == pytest.approx(71 / 512 * 64 * views)
    assert e.states_gib == pytest.approx((16 + 4) * 175e6 / 2**30)
    assert e.need_gib == pytest.approx(MARGIN * (e.activations_gib + e.states_gib))
    assert 30 < e.need_gib < 40  # issue 12: ~36-38 GiB at batch 64 in the DINO setting
    assert estimate_memory("vit_base_patch16_224", 64, DINO_VIEWS, device_gib=H200, **PARAMS) is None


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same stochastic-depth draws in every call
    target = torch.randn(x.shape[0], model.num_features)
    loss = (model(x) * target).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("switch", ["checkpointing", "fused_attn"])
def test_switch_leaves_loss_and_gradients_unchanged(switch: str) -> None:
    torch.manual_seed(0)
    model = build_backbone("swin_tiny_patch4_window7_224", TINY_SWIN).train()
    x = torch.randn(3, 3, 32, 32)
    # 16 px as well: a shifted-window stage, where the attention mask enters
    x_small = torch.randn(3, 3, 16, 16)
    before = [_loss_and_grads(model, x), _loss_and_grads(model, x_small)]
    if switch == "checkpointing":
        model.set_grad_checkpointing(True)
    else:
        assert set_fused_attention(model, True) == sum(TINY_SWIN["depths"])
    after = [_loss_and_grads(model, x), _loss_and_grads(model, x_small)]
    for (l0, g0), (l1, g1) in zip(before, after):
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_fused_attention_refuses_a_model_without_timm_attention() -> None:
    with pytest.raises(ValueError, match="no timm attention module"):
        set_fused_attention(torch.nn.Linear(2, 2), True)


def test_auto_settings_resolve_for_the_device() -> None:
    module = tiny_module(compile="auto", grad_checkpointing="auto", fused_attn=True)
    assert module.compile_enabled() is False  # no trainer: the module's device (CPU)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")))
    assert module.compile_enabled() is True
    module._trainer = None
    assert all(m.fused_attn for m in module.student["backbone"].modules() if hasattr(m, "fused_attn"))
    # On a CPU, auto checkpointing resolves to off at the first batch, and training runs.
    module.student["backbone"].set_grad_checkpointing(True)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        module, datamodule=tiny_datamodule())
    assert all(not s.grad_checkpointing for s in module.student["backbone"].layers)
    with pytest.raises(ValueError, match="grad_checkpointing must be"):
        tiny_module(grad_checkpointing="sometimes")
    with pytest.raises(ValueError, match="compile must be"):
        tiny_module(compile="fast")
