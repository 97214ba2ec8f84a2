"""Multiple-instance pooling (midol/models/mil.py) against a plain restatement of its equations:
the mean over the real instances, and Ilse et al. 2018 eqs. 7-9 written bag by bag in float64."""

from __future__ import annotations

import math

import pytest
import torch

from midol.models.mil import AttentionMIL, MeanPool


def _bags(sizes: list[int], dim: int, seed: int = 0, pad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(sizes)
    x = torch.full((len(sizes), n, dim), pad, dtype=torch.float64)
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    for b, s in enumerate(sizes):
        x[b, :s] = torch.randn(s, dim, generator=g, dtype=torch.float64)
        mask[b, :s] = True
    return x, mask


def _reference_attention(pool: AttentionMIL, bag: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Eq. 9 then eq. 7 for one bag of real instances, one instance at a time."""
    with torch.no_grad():
        return _reference_attention_nograd(pool, bag)


def _reference_attention_nograd(pool: AttentionMIL, bag: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    V, bV = pool.V.weight.double(), pool.V.bias.double()
    w, bw = pool.w.weight.double()[0], pool.w.bias.double()[0]
    scores = []
    for h in bag:
        inner = torch.tanh(V @ h + bV)
        if pool.U is not None:
            inner = inner * torch.sigmoid(pool.U.weight.double() @ h + pool.U.bias.double())
        scores.append(float(w @ inner + bw))
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    a = [e / sum(exps) for e in exps]
    z = sum(ak * h for ak, h in zip(a, bag, strict=True))
    assert isinstance(z, torch.Tensor)
    return z, a


def test_mean_pool_is_the_mean_of_real_instances() -> None:
    x, mask = _bags([3, 1, 5], dim=4, pad=float("nan"))  # padding NaN: must not leak
    z, w = MeanPool()(x, mask)
    for b, s in enumerate([3, 1, 5]):
        torch.testing.assert_close(z[b], x[b, :s].mean(dim=0))
        torch.testing.assert_close(w[b, :s], torch.full((s,), 1.0 / s, dtype=torch.float64))
        assert (w[b, s:] == 0).all()


@pytest.mark.parametrize("gated", [True, False])
def test_attention_equals_eq9_over_real_instances(gated: bool) -> None:
    torch.manual_seed(1)
    pool = AttentionMIL(6, hidden=5, gated=gated).double()
    sizes = [2, 4, 1, 3]
    x, mask = _bags(sizes, dim=6, seed=2, pad=float("nan"))
    z, a = pool(x, mask)
    assert torch.isfinite(z).all()
    for b, s in enumerate(sizes):
        z_ref, a_ref = _reference_attention(pool, x[b, :s])
        torch.testing.assert_close(z[b], z_ref)
        torch.testing.assert_close(a[b, :s], torch.tensor(a_ref, dtype=torch.float64))
        assert (a[b, s:] == 0).all(), "padded instances must get weight exactly 0"
    torch.testing.assert_close(a.sum(dim=1), torch.ones(len(sizes), dtype=torch.float64))


def test_padding_does_not_change_a_bag() -> None:
    torch.manual_seed(0)
    pool = AttentionMIL(3, hidden=4).double()
    x, mask = _bags([2], dim=3, seed=5)
    z_alone, _ = pool(x, mask)
    padded = torch.cat([x, torch.randn(1, 4, 3, dtype=torch.float64) * 100], dim=1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    z_padded, a = pool(padded, pmask)
    torch.testing.assert_close(z_padded, z_alone)
    assert a.shape == (1, 6)


def test_permutation_invariance() -> None:
    torch.manual_seed(0)
    pool = AttentionMIL(8, hidden=16).double()
    x, mask = _bags([5, 3], dim=8, seed=3)
    perm = torch.tensor([4, 0, 3, 1, 2])
    z, a = pool(x, mask)
    z_p, a_p = pool(x[:, perm], mask[:, perm])
    torch.testing.assert_close(z_p, z)
    torch.testing.assert_close(a_p, a[:, perm])
    zm, _ = MeanPool()(x, mask)
    zm_p, _ = MeanPool()(x[:, perm], mask[:, perm])
    torch.testing.assert_close(zm_p, zm)


def test_gradients_reach_real_instances_and_parameters_only() -> None:
    torch.manual_seed(0)
    pool = AttentionMIL(4, hidden=3)
    x, mask = _bags([3, 2], dim=4, seed=4)
    x = x.float().requires_grad_(True)
    z, _ = pool(x, mask)
    z.sum().backward()
    assert x.grad is not None
    assert (x.grad[0, :3].abs().sum(dim=1) > 0).all() and (x.grad[1, :2].abs().sum(dim=1) > 0).all()
    assert (x.grad[1, 2:] == 0).all(), "padding must get no gradient"
    for name, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # gradcheck of the whole pooling in float64 (masked softmax included)
    pool64 = AttentionMIL(3, hidden=2).double()
    xx, mm = _bags([2, 1], dim=3, seed=6)
    xx.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: pool64(t, mm)[0], (xx,))


def test_bad_input_is_one_line_error() -> None:
    pool = AttentionMIL(4)
    with pytest.raises(ValueError, match="no real instance"):
        pool(torch.zeros(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="mask must be"):
        pool(torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bags must be"):
        MeanPool()(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="D = 4"):
        pool(torch.zeros(1, 2, 5))
