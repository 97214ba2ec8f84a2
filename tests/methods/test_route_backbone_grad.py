"""``route_backbone_grad``: with False, L_route (Eq. 15) trains the router but sends no gradient
into the student backbone; with True (the paper's Eq. 21) it does."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import tiny_datamodule, tiny_module


def _batch() -> dict:
    dm = tiny_datamodule()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _route_only_grads(route_backbone_grad: bool, batch: dict,
                      **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared gradient norms of the student backbone and router after backward of L_route
    alone (cst_weight 0)."""
    torch.manual_seed(0)
    module = tiny_module(route_backbone_grad=route_backbone_grad, cst_weight=0.0, route_weight=1.0,
                         **overrides)
    module.train()
    module.training_step(batch, 0)["loss"].backward()
    backbone = [p.grad for p in module.student["backbone"].parameters() if p.grad is not None]
    router = [p.grad for p in module.student["projector"].router.parameters()]
    backbone_sq = sum(((g.double() ** 2).sum() for g in backbone), torch.zeros((), dtype=torch.double))
    router_sq = sum(((g.double() ** 2).sum() for g in router), torch.zeros((), dtype=torch.double))
    return backbone_sq, router_sq


@pytest.mark.parametrize("overrides", [{}, {"router_noise": 0.5}, {"top_k": 3}])
def test_stopped_route_gradient_reaches_the_router_but_not_the_backbone(overrides) -> None:
    batch = _batch()
    backbone_sq, router_sq = _route_only_grads(False, batch, **overrides)
    assert float(backbone_sq) == 0.0
    assert float(router_sq) > 0.0
    backbone_sq, router_sq = _route_only_grads(True, batch, **overrides)
    assert float(backbone_sq) > 0.0
    assert float(router_sq) > 0.0


def test_stopped_route_gradient_keeps_the_loss_values() -> None:
    batch = _batch()
    values = {}
    for flag in (True, False):
        torch.manual_seed(0)
        module = tiny_module(route_backbone_grad=flag, router_noise=0.5)
        module.train()
        out = module.training_step(batch, 0)
        values[flag] = float(out["loss"].detach())
    assert values[False] == pytest.approx(values[True], rel=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"route_backbone_grad": "no"},
    {"route_backbone_grad": False, "use_moe": False, "route_weight": 0.0},
])
def test_route_backbone_grad_is_checked(kwargs) -> None:
    with pytest.raises(ValueError, match="route_backbone_grad"):
        tiny_module(**kwargs)
