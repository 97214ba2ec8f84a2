"""Reference tests for ``midol.losses.expert_infonce_loss`` (M-IDoL Eq. 19-20, docs/papers/m-idol.md).

For expert i with image set B_i (non-empty), s(u, v) = exp(cos(u, v) / tau):

    L_i = -1 / (|B_i| Ms) * sum_{b in B_i} sum_{j < Ms}
              log(  sum_{k < Mt, k != j} s(x[j, b], y[k, b])
                  / sum_{beta in B_i} sum_{k < Mt, k != j} s(x[j, b], y[k, beta]) )

    loss = mean of L_i over the experts that received at least one image.

(A student view j >= Mt has no teacher counterpart, so every teacher view is used for it.)
The reference loops over experts, images, views and negatives, in float64, built from torch
scalars so that autograd yields a reference gradient for the student.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from midol.losses import expert_infonce_loss


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _ref_infonce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    assignment: torch.Tensor,
    num_experts: int,
    temperature: float,
    expert_mean: str = "nonempty",
) -> torch.Tensor:
    ms, B, _ = student.shape
    mt = teacher.shape[0]
    x = student.to(torch.float64)
    y = teacher.detach().to(torch.float64)
    xn = [[_unit(x[j, b]) for b in range(B)] for j in range(ms)]
    yn = [[_unit(y[k, b]) for b in range(B)] for k in range(mt)]
    assign = [int(a) for a in assignment.tolist()]

    def s(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.dot(u, v) / temperature)

    per_expert = []
    for i in range(num_experts):
        members = [b for b in range(B) if assign[b] == i]
        if not members:
            continue  # an empty expert contributes nothing
        total = 0.0
        for b in members:
            for j in range(ms):
                ks = [k for k in range(mt) if k != j]
                assert ks, "reference: view j has no positive"
                numerator = sum(s(xn[j][b], yn[k][b]) for k in ks)
                denominator = sum(s(xn[j][b], yn[k][beta]) for beta in members for k in ks)
                total = total + torch.log(numerator / denominator)
        per_expert.append(-total / (len(members) * ms))
    # Eq. 20 prints 1/N; "nonempty" averages over the experts that received images.
    return sum(per_expert) / (len(per_expert) if expert_mean == "nonempty" else num_experts)


def _make(ms: int, mt: int, B: int, D: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Teacher views are noisy copies of a per-image vector; student views too, so that the
    # positives are actually more similar than the negatives (realistic loss magnitudes).
    # A shared component keeps negatives similar too, so that the loss is not ~0 at tau=0.04.
    base = torch.randn(1, D, generator=g) + torch.randn(B, D, generator=g)
    teacher = base.unsqueeze(0) + 0.7 * torch.randn(mt, B, D, generator=g)
    student = base.unsqueeze(0) + 0.7 * torch.randn(ms, B, D, generator=g)
    assignment = torch.randint(0, E, (B,), generator=g)
    return student, teacher, assignment


def test_reference_is_sane() -> None:
    """Closed form for 1 expert, 2 images, Ms = Mt = 2, orthogonal unit vectors."""
    e = torch.eye(4, dtype=torch.float64)
    # image 0: both views along e0; image 1: both views along e1.
    x = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[0], e[1]])])  # 2 x 2 x 4
    tau = 0.5
    ref = _ref_infonce(x, x.clone(), torch.tensor([0, 0]), 1, tau)
    # each (b, j): log( e^{1/tau} / (e^{1/tau} + e^{0}) )
    expected = -torch.log(torch.exp(torch.tensor(1 / tau)) / (torch.exp(torch.tensor(1 / tau)) + 1))
    assert_close(ref, expected.double())


# --------------------------------------------------------------------------------------
# Values over a grid
# --------------------------------------------------------------------------------------
GRID = list(
    itertools.product(
        [(2, 2), (8, 2), (4, 4)],  # (Ms, Mt)
        [1, 5, 16],  # B
        [3, 32],  # D
        [1, 3, 5],  # num_experts
    )
)
TEMPS = [0.04, 0.1, 0.5]


@pytest.mark.parametrize("views,B,D,E", GRID)
def test_infonce_matches_reference(views: tuple[int, int], B: int, D: int, E: int) -> None:
    ms, mt = views
    seed = 1000 * ms + 100 * mt + 10 * B + D + E
    student, teacher, assignment = _make(ms, mt, B, D, E, seed)
    temperature = TEMPS[seed % len(TEMPS)]  # cycle the temperatures through the grid
    for tau in {temperature, 0.04}:
        out = expert_infonce_loss(student, teacher, assignment, E, temperature=tau)
        assert out.ndim == 0
        assert torch.isfinite(out)
        ref = _ref_infonce(student, teacher, assignment, E, tau)
        assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", TEMPS)
def test_infonce_all_temperatures_with_empty_expert(tau: float) -> None:
    student, teacher, _ = _make(8, 2, 16, 32, 5, seed=1)
    # experts 1 and 4 receive nothing, expert 3 a single image
    assignment = torch.tensor([0, 0, 2, 0, 3, 2, 2, 0, 2, 0, 0, 2, 2, 0, 2, 2])
    out = expert_infonce_loss(student, teacher, assignment, 5, temperature=tau)
    assert torch.isfinite(out)
    ref = _ref_infonce(student, teacher, assignment, 5, tau)
    assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # Mean over the 3 non-empty experts, not over all 5 (the two would differ here).
    assert float(ref) > 1e-3
    assert abs(float(out) - float(ref * 3 / 5)) > 0.1 * float(ref)
    # Eq. 20 as printed: divide by N = 5.
    eq20 = expert_infonce_loss(student, teacher, assignment, 5, temperature=tau, expert_mean="all")
    assert_close(eq20.double(), _ref_infonce(student, teacher, assignment, 5, tau, "all"), rtol=1e-4, atol=1e-5)


def test_infonce_default_temperature_is_0_04() -> None:
    student, teacher, assignment = _make(4, 2, 6, 8, 2, seed=2)
    out = expert_infonce_loss(student, teacher, assignment, 2)
    assert_close(out.double(), _ref_infonce(student, teacher, assignment, 2, 0.04), rtol=1e-4, atol=1e-5)


def test_infonce_single_image_expert_is_zero() -> None:
    student, teacher, _ = _make(4, 2, 3, 8, 3, seed=3)
    # every expert holds exactly one image: numerator == denominator -> 0 for each
    out = expert_infonce_loss(student, teacher, torch.tensor([2, 0, 1]), 3, temperature=0.04)
    assert_close(out, torch.zeros((), dtype=out.dtype), rtol=0, atol=1e-6)
    # one-image expert 0 next to a 2-image expert 1: loss = (0 + L_1) / 2
    student, teacher, _ = _make(2, 2, 3, 8, 2, seed=4)
    assignment = torch.tensor([0, 1, 1])
    out = expert_infonce_loss(student, teacher, assignment, 2, temperature=0.1)
    l1 = _ref_infonce(student[:, 1:], teacher[:, 1:], torch.tensor([0, 0]), 1, 0.1)
    assert_close(out.double(), l1 / 2, rtol=1e-4, atol=1e-6)


def test_infonce_invariant_to_vector_norms() -> None:
    """Cosine similarity: rescaling any representation by a positive factor changes nothing."""
    student, teacher, assignment = _make(4, 2, 8, 16, 3, seed=6)
    g = torch.Generator().manual_seed(60)
    s_scale = torch.rand(4, 8, 1, generator=g) * 10 + 0.1
    t_scale = torch.rand(2, 8, 1, generator=g) * 10 + 0.1
    a = expert_infonce_loss(student, teacher, assignment, 3, temperature=0.1)
    b = expert_infonce_loss(student * s_scale, teacher * t_scale, assignment, 3, temperature=0.1)
    assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Numerical robustness
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.04, 0.01])
def test_infonce_near_identical_vectors_no_nan(tau: float) -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 1, 32, generator=g) * 100
    student = (base + 1e-4 * torch.randn(8, 16, 32, generator=g)).requires_grad_()
    teacher = base + 1e-4 * torch.randn(2, 16, 32, generator=g)
    assignment = torch.tensor([0] * 8 + [1] * 7 + [2])
    out = expert_infonce_loss(student, teacher, assignment, 4, temperature=tau)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(student.grad).all()
    # Everything is (almost) identical: each log-ratio ~ log(|positives| / (|B_i| |positives|))
    ref = _ref_infonce(student.detach(), teacher, assignment, 4, tau)
    assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


def test_infonce_bf16_inputs() -> None:
    student, teacher, assignment = _make(4, 2, 8, 16, 2, seed=8)
    s16, t16 = student.to(torch.bfloat16), teacher.to(torch.bfloat16)
    out = expert_infonce_loss(s16, t16, assignment, 2, temperature=0.1)
    assert torch.isfinite(out)
    ref = _ref_infonce(s16.float(), t16.float(), assignment, 2, 0.1)
    assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ms,mt,B,D,E,tau",
    [(2, 2, 5, 8, 2, 0.1), (8, 2, 6, 4, 3, 0.04), (4, 4, 7, 16, 1, 0.5), (3, 2, 9, 5, 5, 0.2)],
)
def test_infonce_gradient_only_to_student(ms, mt, B, D, E, tau) -> None:
    student, teacher, assignment = _make(ms, mt, B, D, E, seed=9 + ms + B)
    student = student.requires_grad_()
    teacher = teacher.requires_grad_()
    out = expert_infonce_loss(student, teacher, assignment, E, temperature=tau)
    out.backward()
    assert teacher.grad is None or torch.count_nonzero(teacher.grad) == 0
    assert student.grad is not None

    student_ref = student.detach().double().requires_grad_()
    ref = _ref_infonce(student_ref, teacher.detach(), assignment, E, tau)
    (ref_grad,) = torch.autograd.grad(ref, student_ref)
    scale = float(ref_grad.abs().max())
    assert_close(student.grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_infonce_no_positive_raises() -> None:
    student, teacher, assignment = _make(1, 1, 4, 8, 2, seed=10)
    with pytest.raises(ValueError):
        expert_infonce_loss(student, teacher, assignment, 2)
    # Mt = 1: student view 0 has no teacher view k != 0
    student, teacher, assignment = _make(2, 1, 4, 8, 2, seed=11)
    with pytest.raises(ValueError):
        expert_infonce_loss(student, teacher, assignment, 2)


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_infonce_invalid_assignment_raises(bad: int) -> None:
    student, teacher, assignment = _make(2, 2, 4, 8, 3, seed=12)
    assignment = assignment.clone()
    assignment[1] = bad
    with pytest.raises(ValueError):
        expert_infonce_loss(student, teacher, assignment, 3)


def test_infonce_shape_mismatch_raises() -> None:
    student, teacher, assignment = _make(2, 2, 4, 8, 3, seed=13)
    with pytest.raises(ValueError):  # batch sizes differ
        expert_infonce_loss(student, teacher[:, :3], assignment, 3)
    with pytest.raises(ValueError):  # feature dims differ
        expert_infonce_loss(student, teacher[:, :, :5], assignment, 3)
    with pytest.raises(ValueError):  # assignment length differs
        expert_infonce_loss(student, teacher, assignment[:3], 3)
    with pytest.raises(ValueError):  # assignment not 1-D
        expert_infonce_loss(student, teacher, assignment.view(2, 2), 3)
    with pytest.raises(ValueError):  # student not Ms x B x D
        expert_infonce_loss(student[0], teacher, assignment, 3)
