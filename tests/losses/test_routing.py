"""Reference tests for ``midol.losses.routing_consistency_loss`` (M-IDoL Eq. 15, docs/papers/m-idol.md).

    a_S = softmax(student_logits / student_temp)                  (per student view)
    a_T = sinkhorn_knopp(teacher_logits / teacher_temp, eps, iters)  (per teacher view, no grad)
    L   = mean over pairs (j, g), j != g, of mean over images b of
            "student_weighted":  - sum_i a_S[b, j, i] * log a_T[b, g, i]
            "teacher_target":    - sum_i a_T[b, g, i] * log a_S[b, j, i]

The reference loops explicitly over views, images and experts in float64. The student side
is built from torch float64 scalars so autograd gives a reference gradient; the teacher side
(Sinkhorn) is plain Python floats in the log domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch.testing import assert_close

from midol.losses import routing_consistency_loss


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------
def _lse(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _ref_log_sinkhorn(logits: torch.Tensor, eps: float, iters: int) -> list[list[float]]:
    """log of the SwAV Sinkhorn matrix (B x N), every step in the log domain, float64."""
    rows = logits.detach().to(torch.float64).tolist()
    B, N = len(rows), len(rows[0])
    L = [[rows[b][i] / eps for b in range(B)] for i in range(N)]  # N x B
    tot = _lse([L[i][b] for i in range(N) for b in range(B)])
    L = [[L[i][b] - tot for b in range(B)] for i in range(N)]
    for _ in range(iters):
        for i in range(N):
            r = _lse(L[i])
            L[i] = [L[i][b] - r - math.log(N) for b in range(B)]
        for b in range(B):
            c = _lse([L[i][b] for i in range(N)])
            for i in range(N):
                L[i][b] = L[i][b] - c - math.log(B)
    return [[L[i][b] + math.log(B) for i in range(N)] for b in range(B)]


def _ref_log_softmax_rows(logits: torch.Tensor, temp: float) -> list[list[torch.Tensor]]:
    """log softmax of every row of a B x N tensor, as float64 0-d tensors (autograd-able)."""
    x = logits.to(torch.float64)
    B, N = x.shape
    out = []
    for b in range(B):
        z = [x[b, i] / temp for i in range(N)]
        m = max(float(v.detach()) for v in z)  # constant shift, no gradient needed
        lse = m + torch.log(sum(torch.exp(v - m) for v in z))
        out.append([z[i] - lse for i in range(N)])
    return out


def _ref_routing_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    student_temp: float,
    teacher_temp: float,
    eps: float,
    iters: int,
    form: str,
) -> torch.Tensor:
    log_a_s = [_ref_log_softmax_rows(s, student_temp) for s in student]  # [j][b][i]
    log_a_t = [
        _ref_log_sinkhorn(t.detach().double() / teacher_temp, eps, iters) for t in teacher
    ]  # [g][b][i], floats
    B, N = student[0].shape
    pair_losses = []
    for j in range(len(student)):
        for g in range(len(teacher)):
            if j == g:
                continue
            per_image = []
            for b in range(B):
                ce = 0.0
                for i in range(N):
                    if form == "student_weighted":
                        ce = ce - torch.exp(log_a_s[j][b][i]) * log_a_t[g][b][i]
                    elif form == "teacher_target":
                        ce = ce - math.exp(log_a_t[g][b][i]) * log_a_s[j][b][i]
                    else:
                        raise AssertionError(form)
                per_image.append(ce)
            pair_losses.append(sum(per_image) / B)
    return sum(pair_losses) / len(pair_losses)


def _make_logits(ms: int, mt: int, B: int, N: int, seed: int, t_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, N, generator=g, dtype=torch.float32) for _ in range(ms)]
    teacher = [torch.randn(B, N, generator=g, dtype=torch.float32) * t_scale for _ in range(mt)]
    return student, teacher


def test_reference_is_sane() -> None:
    """Two views that agree perfectly on a balanced one-hot routing give ~0 loss."""
    N = 4
    one_hot = torch.eye(N) * 50.0
    student = [one_hot.clone(), one_hot.clone()]
    teacher = [one_hot.clone(), one_hot.clone()]
    for form in ("student_weighted", "teacher_target"):
        ref = _ref_routing_loss(student, teacher, 0.1, 0.04, 0.05, 3, form)
        assert abs(float(ref)) < 1e-6


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------
VIEW_SHAPES = [(2, 2), (8, 2), (4, 4), (3, 1)]
# (B, N, student_temp, teacher_temp, eps, iters, teacher logit scale)
SETTINGS = [
    (4, 5, 0.1, 0.04, 0.05, 3, 1.0),  # paper defaults, very sharp teacher
    (16, 5, 0.1, 0.04, 0.05, 3, 0.05),  # paper defaults, moderate teacher logits
    (7, 3, 0.2, 0.07, 0.05, 1, 0.1),
    (5, 8, 1.0, 1.0, 0.5, 5, 1.0),
    (1, 4, 0.5, 0.1, 0.1, 3, 1.0),  # a single image
]


@pytest.mark.parametrize("form", ["student_weighted", "teacher_target"])
@pytest.mark.parametrize("ms,mt", VIEW_SHAPES)
@pytest.mark.parametrize("B,N,st,tt,eps,iters,scale", SETTINGS)
def test_routing_loss_matches_reference(
    ms: int, mt: int, B: int, N: int, st: float, tt: float, eps: float, iters: int,
    scale: float, form: str,
) -> None:
    student, teacher = _make_logits(ms, mt, B, N, seed=100 * ms + 10 * mt + B + N, t_scale=scale)
    out = routing_consistency_loss(
        student, teacher, student_temp=st, teacher_temp=tt, eps=eps, iters=iters, form=form
    )
    assert out.ndim == 0
    assert torch.isfinite(out)
    ref = _ref_routing_loss(student, teacher, st, tt, eps, iters, form)
    assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)


def test_routing_loss_defaults() -> None:
    student, teacher = _make_logits(8, 2, 6, 5, seed=5, t_scale=0.1)
    out = routing_consistency_loss(student, teacher)
    ref = _ref_routing_loss(student, teacher, 0.1, 0.04, 0.05, 3, "student_weighted")
    assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)


def test_routing_loss_forms_differ() -> None:
    """The two forms are genuinely different objectives (guards against a switch ignored)."""
    student, teacher = _make_logits(2, 2, 8, 4, seed=6, t_scale=0.05)
    a = routing_consistency_loss(student, teacher, form="student_weighted")
    b = routing_consistency_loss(student, teacher, form="teacher_target")
    assert abs(float(a) - float(b)) > 1e-3


def test_routing_loss_very_sharp_teacher_is_finite() -> None:
    """Raw teacher router logits of magnitude ~50 at tau_t = 0.04, eps = 0.05."""
    g = torch.Generator().manual_seed(7)
    student = [torch.randn(16, 5, generator=g) * 30 for _ in range(8)]
    teacher = [(torch.rand(16, 5, generator=g) * 2 - 1) * 50 for _ in range(2)]
    student = [s.requires_grad_() for s in student]
    for form in ("student_weighted", "teacher_target"):
        out = routing_consistency_loss(student, teacher, form=form)
        assert torch.isfinite(out)
        grads = torch.autograd.grad(out, student)
        assert all(torch.isfinite(gr).all() for gr in grads)
        ref = _ref_routing_loss(student, teacher, 0.1, 0.04, 0.05, 3, form)
        assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)


def test_routing_loss_bf16_inputs() -> None:
    student, teacher = _make_logits(4, 2, 8, 5, seed=8, t_scale=0.1)
    s16 = [s.to(torch.bfloat16) for s in student]
    t16 = [t.to(torch.bfloat16) for t in teacher]
    out = routing_consistency_loss(s16, t16)
    assert torch.isfinite(out)
    ref = _ref_routing_loss(
        [s.float() for s in s16], [t.float() for t in t16], 0.1, 0.04, 0.05, 3, "student_weighted"
    )
    assert_close(out.double(), ref.detach(), rtol=2e-2, atol=1e-2)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_routing_loss_no_pair_raises() -> None:
    student, teacher = _make_logits(1, 1, 4, 3, seed=9)
    with pytest.raises(ValueError):
        routing_consistency_loss(student, teacher)


def test_routing_loss_unknown_form_raises() -> None:
    student, teacher = _make_logits(2, 2, 4, 3, seed=10)
    with pytest.raises(ValueError):
        routing_consistency_loss(student, teacher, form="nonsense")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["student_weighted", "teacher_target"])
@pytest.mark.parametrize("ms,mt", [(2, 2), (8, 2), (3, 1)])
def test_routing_loss_gradient_only_to_student(ms: int, mt: int, form: str) -> None:
    student, teacher = _make_logits(ms, mt, 6, 4, seed=11 + ms + mt, t_scale=0.1)
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    out = routing_consistency_loss(student, teacher, form=form)
    out.backward()
    for t in teacher:
        assert t.grad is None or torch.count_nonzero(t.grad) == 0

    # Student gradient equals the autograd gradient of the float64 loop reference.
    student_ref = [s.detach().double().requires_grad_() for s in student]
    ref = _ref_routing_loss(student_ref, teacher, 0.1, 0.04, 0.05, 3, form)
    ref_grads = torch.autograd.grad(ref, student_ref, allow_unused=True, materialize_grads=True)
    scale = max(float(rg.abs().max()) for rg in ref_grads)
    for j, (s, rg) in enumerate(zip(student, ref_grads)):
        if j == 0 and mt == 1:
            # Student view 0 has no partner (its only teacher view is itself): no gradient.
            assert s.grad is None or torch.count_nonzero(s.grad) == 0
            continue
        assert s.grad is not None
        assert_close(s.grad.double(), rg, rtol=1e-4, atol=1e-5 * scale)
        assert torch.count_nonzero(s.grad) > 0


def test_routing_loss_teacher_not_differentiated_even_if_perturbed() -> None:
    """The loss value depends on the teacher, but no gradient reaches it."""
    student, teacher = _make_logits(2, 2, 8, 4, seed=12, t_scale=0.1)
    a = routing_consistency_loss(student, teacher)
    teacher2 = [t + torch.randn_like(t) for t in teacher]
    b = routing_consistency_loss(student, teacher2)
    assert abs(float(a) - float(b)) > 1e-4


def test_switch_load_balance_loss_matches_definition() -> None:
    """N * sum_i f_i P_i: 1 for uniform routing, N when one expert takes every row."""
    from midol.losses import switch_load_balance_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g, requires_grad=True)
    index = logits.argmax(-1)
    out = switch_load_balance_loss(logits, index)
    probs = logits.detach().double().softmax(-1)
    expected = 0.0
    for i in range(4):
        f = sum(1.0 for t in range(12) if int(index[t]) == i) / 12
        p = sum(float(probs[t, i]) for t in range(12)) / 12
        expected += f * p
    assert abs(float(out) - 4 * expected) < 1e-6
    out.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    flat = torch.zeros(8, 4)
    assert float(switch_load_balance_loss(flat, torch.arange(8) % 4)) == pytest.approx(1.0)
    peaked = torch.tensor([[50.0, 0, 0, 0]] * 8)
    assert float(switch_load_balance_loss(peaked, torch.zeros(8, dtype=torch.long))) == pytest.approx(4.0)
