"""The M-IDoL losses compute in float32 even inside a bf16 autocast region.

``.float()`` casts alone do not do this: autocast re-casts the inputs of every op on its
lower-precision list (``einsum`` lowers to ``bmm``) to bf16, so the logits of L_cst, the DINO
cross-entropy and L_route would silently be formed in bf16 (an error of ~0.04 on an InfoNCE
logit of size 9). Each loss below is called on the same float32 inputs outside and inside
``torch.autocast("cpu", dtype=torch.bfloat16)``; value and gradient must agree to float32
tolerance. (Lightning's ``bf16-mixed`` runs ``training_step`` in such a region.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.testing import assert_close

from midol.losses import (
    DINOLoss,
    dino_cross_entropy,
    expert_infonce_loss,
    log_sinkhorn_knopp,
    log_sinkhorn_knopp_authors,
    routing_consistency_loss,
    routing_cross_entropy,
    teacher_routing_log_probs,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
MS, MT, B = 4, 2, 16  # student views (2 global + 2 local), teacher views, images


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _value_and_grads(
    loss_fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], autocast: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    if autocast:
        with _bf16_autocast():
            loss = loss_fn(*leaves)
    else:
        loss = loss_fn(*leaves)
    loss.backward()
    grads = [x.grad for x in leaves if x.requires_grad]
    return loss.detach(), grads


def _assert_autocast_invariant(loss_fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> None:
    ref, ref_grads = _value_and_grads(loss_fn, inputs, autocast=False)
    got, grads = _value_and_grads(loss_fn, inputs, autocast=True)
    assert ref.dtype == torch.float32 and got.dtype == torch.float32
    assert torch.isfinite(ref) and ref.abs() > 1e-3  # a real value, not a degenerate 0
    assert_close(got, ref, **TOL)
    assert len(grads) == len(ref_grads)
    assert any(r is not None for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)  # the teacher side is a constant in both runs
        if r is not None:
            assert r.abs().max() > 0
            assert_close(g, r, **TOL)


def test_cpu_bf16_autocast_really_lowers_einsum():
    """Guards the tests below against passing vacuously: on this torch, a float32 einsum in a
    CPU bf16 autocast region is computed (and returned) in bf16."""
    a, b = _randn(3, 8, seed=0), _randn(5, 8, seed=1)
    with _bf16_autocast():
        assert torch.einsum("id,jd->ij", a, b).dtype == torch.bfloat16


@pytest.mark.parametrize("expert_mean", ["nonempty", "all"])
def test_expert_infonce_loss(expert_mean):
    student, teacher = _randn(MS, B, 32, seed=2), _randn(MT, B, 32, seed=3)
    assignment = torch.arange(B) % 3

    def loss(s, t):
        return expert_infonce_loss(s, t, assignment, 3, temperature=0.04, expert_mean=expert_mean)

    _assert_autocast_invariant(loss, [student, teacher])


def test_dino_cross_entropy():
    student = [_randn(B, 64, seed=10 + j, scale=3.0) for j in range(MS)]
    teacher = [_randn(B, 64, seed=20 + g, scale=3.0) for g in range(MT)]
    center = _randn(1, 64, seed=30, scale=0.5)

    def loss(*views):
        return dino_cross_entropy(views[:MS], views[MS:], center, 0.1, 0.04)

    _assert_autocast_invariant(loss, [*student, *teacher])


def test_dino_loss_module_value_gradient_and_centre():
    student = [_randn(B, 64, seed=40 + j, scale=3.0) for j in range(MS)]
    teacher = [_randn(B, 64, seed=50 + g, scale=3.0) for g in range(MT)]
    centre = _randn(1, 64, seed=60, scale=0.5)
    modules = []

    def loss(*views):
        module = DINOLoss(64)
        module.center.copy_(centre)
        modules.append(module)
        return module(views[:MS], views[MS:], teacher_temp=0.04)

    _assert_autocast_invariant(loss, [*student, *teacher])
    plain, under_autocast = modules
    assert under_autocast.center.dtype == torch.float32
    assert not torch.equal(plain.center, centre)  # the centre moved
    assert_close(under_autocast.center, plain.center, **TOL)


@pytest.mark.parametrize("form", ["student_weighted", "teacher_target"])
def test_routing_consistency_loss(form):
    student = [_randn(B, 5, seed=70 + j, scale=2.0) for j in range(MS)]
    teacher = [_randn(B, 5, seed=80 + g, scale=2.0) for g in range(MT)]

    def loss(*views):
        return routing_consistency_loss(views[:MS], views[MS:], 0.1, 0.04, form=form)

    _assert_autocast_invariant(loss, [*student, *teacher])


@pytest.mark.parametrize("impl", ["swav", "authors"])
def test_routing_cross_entropy_on_either_sinkhorn(impl):
    student = [_randn(B, 5, seed=90 + j, scale=2.0) for j in range(MS)]
    teacher = [_randn(B, 5, seed=100 + g, scale=2.0) for g in range(MT)]

    def loss(*views):
        log_a_t = teacher_routing_log_probs(views[MS:], 0.04, impl=impl)
        return routing_cross_entropy(views[:MS], log_a_t, 0.1)

    _assert_autocast_invariant(loss, [*student, *teacher])


@pytest.mark.parametrize("sinkhorn", [log_sinkhorn_knopp, log_sinkhorn_knopp_authors])
def test_sinkhorn_log_routing(sinkhorn):
    logits = _randn(B, 5, seed=110, scale=2.0 / 0.04)
    ref = sinkhorn(logits)
    with _bf16_autocast():
        got = sinkhorn(logits)
    assert got.dtype == torch.float32
    assert torch.isfinite(ref).all()
    assert_close(got, ref, **TOL)
