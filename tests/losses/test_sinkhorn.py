"""Reference tests for ``midol.losses.sinkhorn_knopp`` / ``log_sinkhorn_knopp``.

The references below restate the SwAV/DINO ``distributed_sinkhorn`` algorithm with
explicit Python loops over plain Python floats (float64), independent of torch:

    Q = exp(logits / eps).T            # N x B
    Q /= Q.sum()
    repeat iters times:
        Q /= Q.sum(dim=1, keepdim=True); Q /= N     # rows (experts)
        Q /= Q.sum(dim=0, keepdim=True); Q /= B     # columns (images)
    Q *= B
    return Q.T                          # B x N

``_ref_sinkhorn_plain`` is literally that formula (only usable for moderate logits).
``_ref_log_sinkhorn`` is the same algorithm carried out on log Q (usable for any logits).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from midol.losses import log_sinkhorn_knopp, sinkhorn_knopp
from tests.helpers.sinkhorn_reference import authors_reference


# --------------------------------------------------------------------------------------
# Plain, loop-based references (Python floats = IEEE float64)
# --------------------------------------------------------------------------------------
def _ref_sinkhorn_plain(logits: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The SwAV formula, verbatim, with explicit loops. Returns B x N float64."""
    rows = logits.detach().to(torch.float64).tolist()  # B lists of N floats
    B, N = len(rows), len(rows[0])
    # Q[i][b] : expert i, image b  (this is the transpose of the logits)
    Q = [[math.exp(rows[b][i] / eps) for b in range(B)] for i in range(N)]
    total = sum(Q[i][b] for i in range(N) for b in range(B))
    Q = [[Q[i][b] / total for b in range(B)] for i in range(N)]
    for _ in range(iters):
        for i in range(N):  # normalise each expert row to total mass 1/N
            row_sum = sum(Q[i][b] for b in range(B))
            for b in range(B):
                Q[i][b] = Q[i][b] / row_sum / N
        for b in range(B):  # normalise each image column to total mass 1/B
            col_sum = sum(Q[i][b] for i in range(N))
            for i in range(N):
                Q[i][b] = Q[i][b] / col_sum / B
    out = [[Q[i][b] * B for i in range(N)] for b in range(B)]
    return torch.tensor(out, dtype=torch.float64)


def _lse(values: list[float]) -> float:
    """log(sum(exp(v))) of a list of floats, computed stably."""
    m = max(values)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(v - m) for v in values))


def _ref_log_sinkhorn(logits: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Same algorithm, every step done on log Q. Returns log of the B x N result, float64."""
    rows = logits.detach().to(torch.float64).tolist()
    B, N = len(rows), len(rows[0])
    L = [[rows[b][i] / eps for b in range(B)] for i in range(N)]  # log Q, N x B
    log_total = _lse([L[i][b] for i in range(N) for b in range(B)])
    L = [[L[i][b] - log_total for b in range(B)] for i in range(N)]
    log_n, log_b = math.log(N), math.log(B)
    for _ in range(iters):
        for i in range(N):
            r = _lse(L[i])
            L[i] = [L[i][b] - r - log_n for b in range(B)]
        for b in range(B):
            c = _lse([L[i][b] for i in range(N)])
            for i in range(N):
                L[i][b] = L[i][b] - c - log_b
    out = [[L[i][b] + log_b for i in range(N)] for b in range(B)]
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------
# Sanity of the references themselves (cheap; guards against a wrong reference)
# --------------------------------------------------------------------------------------
def test_references_agree_with_each_other() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    plain = _ref_sinkhorn_plain(logits, eps=0.5, iters=3)
    logd = _ref_log_sinkhorn(logits, eps=0.5, iters=3).exp()
    assert_close(plain, logd, rtol=1e-12, atol=1e-14)
    # iters = 0 is a plain softmax over the whole matrix, times B
    p0 = _ref_sinkhorn_plain(logits, eps=0.5, iters=0)
    assert_close(p0, torch.softmax((logits / 0.5).flatten(), 0).view(7, 4) * 7)


# --------------------------------------------------------------------------------------
# Implementation vs. reference
# --------------------------------------------------------------------------------------
# (B, N, eps, iters, logit scale). logits / eps stays within ~+-40 so the plain exp is safe.
MODERATE_CASES = [
    (1, 1, 0.05, 3, 1.0),
    (1, 5, 0.05, 3, 1.0),
    (4, 1, 0.05, 3, 1.0),
    (8, 5, 0.05, 3, 1.0),
    (16, 5, 0.05, 1, 1.0),
    (16, 3, 0.1, 3, 2.0),
    (5, 8, 0.5, 3, 5.0),
    (33, 4, 0.05, 10, 1.0),
    (64, 5, 1.0, 3, 3.0),
    (12, 16, 0.2, 2, 2.0),
]


@pytest.mark.parametrize("B,N,eps,iters,scale", MODERATE_CASES)
def test_sinkhorn_matches_plain_formula(B: int, N: int, eps: float, iters: int, scale: float) -> None:
    g = torch.Generator().manual_seed(1000 * B + N + iters)
    logits = torch.randn(B, N, generator=g) * scale
    out = sinkhorn_knopp(logits, eps=eps, iters=iters)
    assert out.shape == (B, N)
    assert out.dtype == torch.float32
    ref = _ref_sinkhorn_plain(logits, eps=eps, iters=iters)
    assert_close(out.double(), ref, rtol=2e-5, atol=1e-7)

    log_out = log_sinkhorn_knopp(logits, eps=eps, iters=iters)
    assert log_out.shape == (B, N)
    assert torch.isfinite(log_out).all()
    assert_close(log_out.double(), ref.log(), rtol=2e-6, atol=2e-5)


def test_sinkhorn_default_arguments() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 5, generator=g)
    ref = _ref_sinkhorn_plain(logits, eps=0.05, iters=3)
    assert_close(sinkhorn_knopp(logits).double(), ref, rtol=2e-5, atol=1e-7)
    assert_close(log_sinkhorn_knopp(logits).double(), ref.log(), rtol=0, atol=2e-5)


def test_sinkhorn_iterations_matter() -> None:
    """Guards against an implementation that ignores ``iters``."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 5, generator=g) * 2
    a = sinkhorn_knopp(logits, eps=0.05, iters=1)
    b = sinkhorn_knopp(logits, eps=0.05, iters=3)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("B,N", [(8, 5), (32, 4), (64, 5), (10, 10)])
def test_sinkhorn_rows_sum_to_one(B: int, N: int) -> None:
    g = torch.Generator().manual_seed(B + N)
    logits = torch.randn(B, N, generator=g) * 3
    q = sinkhorn_knopp(logits, eps=0.05, iters=3)
    assert (q >= 0).all()
    assert_close(q.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)


@pytest.mark.parametrize("B,N", [(20, 5), (64, 4), (30, 3)])
def test_sinkhorn_expert_mass_balanced(B: int, N: int) -> None:
    g = torch.Generator().manual_seed(7 * B + N)
    # Make the logits strongly prefer expert 0 so that balancing is actually needed.
    logits = torch.randn(B, N, generator=g)
    logits[:, 0] += 2.0
    target = torch.full((N,), B / N)

    unbalanced = torch.softmax(logits / 0.05, dim=1).sum(0)
    assert (unbalanced - target).abs().max() > 0.25 * B / N  # the problem is non-trivial

    q3 = sinkhorn_knopp(logits, eps=0.05, iters=3)
    col3 = q3.sum(dim=0)
    # Approximately balanced after 3 iterations, and much better than no balancing.
    assert (col3 - target).abs().max() < 0.5 * (unbalanced - target).abs().max()
    assert_close(col3.double(), _ref_sinkhorn_plain(logits, 0.05, 3).sum(0), rtol=1e-4, atol=1e-4)

    q200 = sinkhorn_knopp(logits, eps=0.05, iters=200)
    assert_close(q200.sum(dim=0), target, rtol=0, atol=1e-3 * B / N)
    assert_close(q200.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)


# Very sharp logits: (raw magnitude, teacher temperature, eps); the caller passes raw / temp.
SHARP_CASES = [
    (10.0, 0.04, 0.05, 16, 5),
    (30.0, 0.04, 0.05, 64, 5),
    (100.0, 0.04, 0.05, 32, 4),
    (100.0, 0.04, 0.05, 8, 8),
]


@pytest.mark.parametrize("mag,temp,eps,B,N", SHARP_CASES)
def test_sinkhorn_sharp_logits_finite_and_correct(
    mag: float, temp: float, eps: float, B: int, N: int
) -> None:
    g = torch.Generator().manual_seed(int(mag) + B)
    raw = (torch.rand(B, N, generator=g) * 2 - 1) * mag
    logits = raw / temp  # float32, as a caller would pass them
    # The naive exp overflows here: the test is meaningful.
    assert not torch.isfinite(torch.exp(logits / eps)).all()

    q = sinkhorn_knopp(logits, eps=eps, iters=3)
    lq = log_sinkhorn_knopp(logits, eps=eps, iters=3)
    assert torch.isfinite(q).all()
    assert torch.isfinite(lq).all()
    assert_close(q.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)

    ref_log = _ref_log_sinkhorn(logits, eps=eps, iters=3)
    # float32 rounding of logits/eps (values up to ~5e4, ulp ~4e-3) limits the agreement.
    tol = 1e-6 * float(logits.abs().max()) / eps + 1e-5
    assert_close(q.double(), ref_log.exp(), rtol=0, atol=tol)
    # log values: compare where the probability is not negligible (tiny ones are far
    # negative and only meaningful up to float32 relative precision).
    big = ref_log > -50
    assert_close(lq.double()[big], ref_log[big], rtol=0, atol=tol)
    assert_close(lq.double(), ref_log, rtol=1e-5, atol=tol)


def test_sinkhorn_bf16_input() -> None:
    g = torch.Generator().manual_seed(11)
    logits32 = torch.randn(24, 5, generator=g) * 0.5  # moderate after / eps
    logits16 = logits32.to(torch.bfloat16)
    q16 = sinkhorn_knopp(logits16, eps=0.05, iters=3)
    assert q16.dtype == torch.float32
    assert torch.isfinite(q16).all()
    # Computed in float32 internally: identical to running on the up-cast input.
    q_up = sinkhorn_knopp(logits16.float(), eps=0.05, iters=3)
    assert_close(q16, q_up, rtol=1e-5, atol=1e-7)
    assert_close(q16.double(), _ref_sinkhorn_plain(logits16.float(), 0.05, 3), rtol=2e-5, atol=1e-6)
    # ...and close to the float32 result on the un-rounded logits.
    q32 = sinkhorn_knopp(logits32, eps=0.05, iters=3)
    assert_close(q16, q32, rtol=0, atol=0.05)

    lq16 = log_sinkhorn_knopp(logits16, eps=0.05, iters=3)
    assert lq16.dtype == torch.float32
    assert torch.isfinite(lq16).all()


def test_sinkhorn_sharp_bf16_no_nan() -> None:
    g = torch.Generator().manual_seed(12)
    logits = ((torch.rand(32, 5, generator=g) * 2 - 1) * 50 / 0.04).to(torch.bfloat16)
    q = sinkhorn_knopp(logits, eps=0.05, iters=3)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all()
    assert torch.isfinite(log_sinkhorn_knopp(logits, eps=0.05, iters=3)).all()
    assert_close(q.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)


def test_sinkhorn_does_not_modify_input_and_no_grad_needed() -> None:
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 3, generator=g)
    before = logits.clone()
    sinkhorn_knopp(logits, eps=0.05, iters=3)
    log_sinkhorn_knopp(logits, eps=0.05, iters=3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_authors_sinkhorn_matches_a_restatement_of_the_released_code(scale: float) -> None:
    from midol.losses import log_balanced_routing, log_sinkhorn_knopp_authors

    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(32, 5, generator=g, dtype=torch.float64) * scale / 0.04
    ours = log_sinkhorn_knopp_authors(logits, eps=0.05, iters=3)
    ref = authors_reference(logits.numpy(), 0.05, 3)
    # float32 inside (as there); compare probabilities, and logs where they are not floored
    np.testing.assert_allclose(ours.exp().numpy(), np.exp(ref), atol=2e-6)
    assert float(-ours.min()) <= -math.log(1e-12) + 1e-3  # the floor caps -log a_T
    torch.testing.assert_close(log_balanced_routing(logits, 0.05, 3, "authors"), ours)
    # it is not SwAV's matrix: the per-image shift changes the balancing
    swav = log_balanced_routing(logits, 0.05, 3, "swav")
    assert not torch.allclose(swav.exp(), ours.exp(), atol=1e-3)
    with pytest.raises(ValueError, match="sinkhorn_impl"):
        log_balanced_routing(logits, 0.05, 3, "other")  # type: ignore[arg-type]
