"""Reference tests for ``midol.losses.dino_cross_entropy`` and ``midol.losses.DINOLoss``
(the authors' code variant of L_cst, i.e. the DINO loss).

    loss = mean over pairs (j student view, g teacher view, j != g) of
           mean over images b of
           - sum_d softmax((t_g[b] - center) / teacher_temp)[d] * log_softmax(s_j[b] / student_temp)[d]

    DINOLoss.forward: loss with the current center, then
    center <- m * center + (1 - m) * mean over all rows of all teacher views.

The reference loops over pairs, images and output dimensions in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch.testing import assert_close

from midol.losses import DINOLoss, dino_cross_entropy


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def _ref_softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    z = sum(e)
    return [v / z for v in e]


def _ref_log_softmax(row: torch.Tensor, temp: float) -> list[torch.Tensor]:
    """log softmax(row / temp) as float64 0-d tensors (autograd-able)."""
    z = [row[d].to(torch.float64) / temp for d in range(row.shape[0])]
    m = max(float(v.detach()) for v in z)
    lse = m + torch.log(sum(torch.exp(v - m) for v in z))
    return [v - lse for v in z]


def _ref_dino(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    c = center.detach().double().reshape(-1).tolist()
    B, D = student[0].shape
    targets = [
        [
            _ref_softmax([(float(t[b, d]) - c[d]) / teacher_temp for d in range(D)])
            for b in range(B)
        ]
        for t in teacher
    ]  # [g][b][d]
    pair_losses = []
    for j, s in enumerate(student):
        logp = [_ref_log_softmax(s[b], student_temp) for b in range(B)]  # [b][d]
        for g in range(len(teacher)):
            if g == j:
                continue
            per_image = []
            for b in range(B):
                ce = 0.0
                for d in range(D):
                    ce = ce - targets[g][b][d] * logp[b][d]
                per_image.append(ce)
            pair_losses.append(sum(per_image) / B)
    return sum(pair_losses) / len(pair_losses)


def _make(ms: int, mt: int, B: int, D: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, D, generator=g) * scale for _ in range(ms)]
    teacher = [torch.randn(B, D, generator=g) * scale for _ in range(mt)]
    center = torch.randn(1, D, generator=g) * 0.3
    return student, teacher, center


def test_reference_is_sane() -> None:
    """Uniform outputs: the cross-entropy of two uniform distributions is log D."""
    D = 7
    student = [torch.zeros(3, D) for _ in range(2)]
    teacher = [torch.zeros(3, D) for _ in range(2)]
    ref = _ref_dino(student, teacher, torch.zeros(1, D), 0.1, 0.04)
    assert_close(ref, torch.tensor(math.log(D), dtype=torch.float64))


# --------------------------------------------------------------------------------------
# dino_cross_entropy values
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ms,mt", [(2, 2), (8, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize(
    "B,D,st,tt,scale",
    [(4, 16, 0.1, 0.04, 1.0), (1, 8, 0.1, 0.07, 3.0), (6, 33, 0.2, 0.1, 1.0), (3, 5, 1.0, 1.0, 1.0)],
)
def test_dino_cross_entropy_matches_reference(ms, mt, B, D, st, tt, scale) -> None:
    student, teacher, center = _make(ms, mt, B, D, seed=ms * 100 + mt * 10 + B + D, scale=scale)
    out = dino_cross_entropy(student, teacher, center, student_temp=st, teacher_temp=tt)
    assert out.ndim == 0
    ref = _ref_dino(student, teacher, center, st, tt)
    assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_dino_cross_entropy_defaults_and_center_matters() -> None:
    student, teacher, center = _make(4, 2, 5, 12, seed=1)
    out = dino_cross_entropy(student, teacher, center)
    assert_close(out.double(), _ref_dino(student, teacher, center, 0.1, 0.04).detach(), rtol=1e-5, atol=1e-5)
    no_center = dino_cross_entropy(student, teacher, torch.zeros_like(center))
    assert abs(float(out) - float(no_center)) > 1e-3


def test_dino_cross_entropy_sharp_is_finite() -> None:
    student, teacher, center = _make(8, 2, 8, 64, seed=2, scale=50.0)
    student = [s.requires_grad_() for s in student]
    out = dino_cross_entropy(student, teacher, center)
    assert torch.isfinite(out)
    out.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)
    ref = _ref_dino(student, teacher, center, 0.1, 0.04)
    assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ms,mt", [(2, 2), (8, 2), (3, 1)])
def test_dino_cross_entropy_gradient(ms: int, mt: int) -> None:
    student, teacher, center = _make(ms, mt, 4, 10, seed=3 + ms)
    student = [s.requires_grad_() for s in student]
    out = dino_cross_entropy(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    out.backward()
    student_ref = [s.detach().double().requires_grad_() for s in student]
    ref = _ref_dino(student_ref, teacher, center, 0.1, 0.04)
    ref_grads = torch.autograd.grad(ref, student_ref, allow_unused=True, materialize_grads=True)
    scale = max(float(g.abs().max()) for g in ref_grads)
    for j, (s, rg) in enumerate(zip(student, ref_grads)):
        if mt == 1 and j == 0:  # no partner view -> no gradient
            assert s.grad is None or torch.count_nonzero(s.grad) == 0
            continue
        assert_close(s.grad.double(), rg, rtol=1e-4, atol=1e-6 * scale)


def test_dino_cross_entropy_no_pair_raises() -> None:
    student, teacher, center = _make(1, 1, 4, 6, seed=4)
    with pytest.raises(ValueError):
        dino_cross_entropy(student, teacher, center)


# --------------------------------------------------------------------------------------
# DINOLoss (centering)
# --------------------------------------------------------------------------------------
def test_dino_loss_module_center_buffer() -> None:
    mod = DINOLoss(out_dim=6)
    assert mod.center.shape == (1, 6)
    assert torch.count_nonzero(mod.center) == 0
    assert "center" in dict(mod.named_buffers())
    assert "center" in mod.state_dict()


def test_dino_loss_center_update_by_hand() -> None:
    mod = DINOLoss(out_dim=3, student_temp=0.1, center_momentum=0.9)
    student = [torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0]]) for _ in range(3)]
    student[1] = student[1] * 2
    student[2] = student[2] - 1
    t1 = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]), torch.tensor([[0.0, 0.0, 0.0], [4.0, 2.0, 1.0]])]
    # mean of the 4 teacher rows = [2, 2, 2.25]
    loss1 = mod(student, t1, teacher_temp=0.04)
    # loss computed with the *old* (zero) center
    assert_close(loss1.double(), _ref_dino(student, t1, torch.zeros(1, 3), 0.1, 0.04).detach(), rtol=1e-5, atol=1e-5)
    c1 = torch.tensor([[0.2, 0.2, 0.225]])
    assert_close(mod.center, c1, rtol=0, atol=1e-6)

    t2 = [torch.tensor([[-2.0, 0.0, 6.0], [2.0, 4.0, -2.0]]), torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])]
    # mean of the 4 rows = [1, 2, 2]
    loss2 = mod(student, t2, teacher_temp=0.07)
    assert_close(loss2.double(), _ref_dino(student, t2, c1, 0.1, 0.07).detach(), rtol=1e-5, atol=1e-5)
    c2 = torch.tensor([[0.9 * 0.2 + 0.1 * 1.0, 0.9 * 0.2 + 0.1 * 2.0, 0.9 * 0.225 + 0.1 * 2.0]])
    assert_close(mod.center, c2, rtol=0, atol=1e-6)  # [[0.28, 0.38, 0.4025]]


def test_dino_loss_momentum_and_student_temp_used() -> None:
    student, teacher, _ = _make(4, 2, 5, 8, seed=5)
    mod = DINOLoss(out_dim=8, student_temp=0.2, center_momentum=0.5)
    loss = mod(student, teacher, teacher_temp=0.05)
    assert_close(loss.double(), _ref_dino(student, teacher, torch.zeros(1, 8), 0.2, 0.05).detach(), rtol=1e-5, atol=1e-5)
    mean_rows = torch.cat(teacher).mean(0, keepdim=True)
    assert_close(mod.center, 0.5 * mean_rows, rtol=1e-5, atol=1e-6)
    loss_b = mod(student, teacher, teacher_temp=0.05)
    assert_close(loss_b.double(), _ref_dino(student, teacher, 0.5 * mean_rows, 0.2, 0.05).detach(), rtol=1e-5, atol=1e-5)
    assert_close(mod.center, 0.75 * mean_rows, rtol=1e-5, atol=1e-6)


def test_dino_loss_center_not_differentiable_and_gradient_to_student() -> None:
    student, teacher, _ = _make(2, 2, 4, 6, seed=6)
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    mod = DINOLoss(out_dim=6)
    loss = mod(student, teacher, teacher_temp=0.04)
    loss.backward()
    assert not mod.center.requires_grad
    assert all(s.grad is not None and torch.count_nonzero(s.grad) > 0 for s in student)


def test_dino_loss_no_pair_raises() -> None:
    student, teacher, _ = _make(1, 1, 4, 6, seed=7)
    with pytest.raises(ValueError):
        DINOLoss(out_dim=6)(student, teacher, teacher_temp=0.04)


def test_dino_loss_in_float64_matches_the_equation_and_keeps_its_centre_float64() -> None:
    """``DINOLoss(...).double()`` on float64 inputs (failed in 0.1.0: the centre was not cast)."""
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    loss_fn = DINOLoss(6, student_temp=0.1, center_momentum=0.9).double()
    loss_fn.center.copy_(torch.randn(1, 6, generator=g, dtype=torch.float64))
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    terms = [-(((t - center) / 0.04).softmax(-1) * (s / 0.1).log_softmax(-1)).sum(-1).mean()
             for j, s in enumerate(student) for g_, t in enumerate(teacher) if j != g_]
    assert loss.dtype == torch.float64 and loss_fn.center.dtype == torch.float64
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)
    expected_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center, rtol=1e-12, atol=1e-12)


def test_deferred_centre_waits_for_commit_and_equals_the_immediate_update() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(4, 8) for _ in range(2)]
    student = [torch.randn(4, 8) for _ in range(3)]
    now, later = DINOLoss(8, center_momentum=0.9), DINOLoss(8, center_momentum=0.9)
    later.defer = True
    assert_close(now(student, teacher, 0.04), later(student, teacher, 0.04))  # same centre used
    assert torch.equal(later.center, torch.zeros(1, 8)) and not torch.equal(now.center, later.center)
    assert later.commit() is True and later.commit() is False  # applied once
    assert_close(later.center, now.center)
    # centre <- m c + (1 - m) mean(teacher rows), by hand
    assert_close(later.center, 0.1 * torch.cat(teacher).mean(0, keepdim=True))
    later(student, teacher, 0.04)
    later.discard()  # a skipped step: no trace of it
    assert later.commit() is False
    assert_close(later.center, now.center)
