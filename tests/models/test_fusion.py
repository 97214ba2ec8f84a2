"""MedMIX fusion blocks against plain restatements, and the absent-input guarantees."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from midol.models.fusion import (
    MISSING_CODE,
    ExpertPooling,
    InputFusion,
    TabularEncoder,
    masked_softmax,
)

FUSION_MODES = ("reliability", "mean", "concat_missing", "transformer")
DIM = 8


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixed_mask(batch: int, inputs: int, seed: int) -> torch.Tensor:
    """A presence mask with some absent entries and at least one present input per row."""
    mask = torch.rand(batch, inputs, generator=seeded(seed)) > 0.4
    mask[torch.arange(batch), torch.arange(batch) % inputs] = True
    assert not bool(mask.all()), "the mask must contain absent entries to test anything"
    return mask


# --- masked_softmax ------------------------------------------------------------------------
def test_masked_softmax_matches_softmax_over_present_entries() -> None:
    scores = torch.randn(6, 5, generator=seeded(0), dtype=torch.float64) * 3
    mask = mixed_mask(6, 5, 1)
    weights = masked_softmax(scores, mask)
    for b in range(6):
        idx = mask[b].nonzero().flatten()
        expected = torch.zeros(5, dtype=torch.float64)
        ex = [math.exp(float(scores[b, i])) for i in idx]
        for i, e in zip(idx.tolist(), ex, strict=True):
            expected[i] = e / sum(ex)
        assert_close(weights[b], expected)
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))


def test_masked_softmax_ignores_nan_and_inf_at_absent_entries() -> None:
    scores = torch.randn(4, 3, generator=seeded(2)).requires_grad_()
    mask = torch.tensor([[True, False, True], [False, True, False],
                         [True, True, True], [False, False, True]])
    clean = masked_softmax(scores, mask)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(4, 1)
    dirty_scores = torch.where(mask, scores, garbage)
    dirty = masked_softmax(dirty_scores, mask)
    assert torch.equal(clean, dirty)
    (clean * torch.arange(3.0)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[~mask], torch.zeros(int((~mask).sum())))
    # a fully masked row is all zeros, not NaN
    assert torch.equal(masked_softmax(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)),
                       torch.zeros(2, 3))


# --- ExpertPooling -------------------------------------------------------------------------
IN_DIMS = (5, 12, 7)


def expert_inputs(batch: int, seed: int) -> list[torch.Tensor]:
    g = seeded(seed)
    return [torch.randn(batch, d, generator=g) for d in IN_DIMS]


def projected(pool: ExpertPooling, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """h_k = LayerNorm(W_k e_k), restated from the parameters."""
    out = []
    for seq, e in zip(pool.projections, experts, strict=True):
        lin, ln = seq[0], seq[1]
        y = e @ lin.weight.T + lin.bias
        mu = y.mean(-1, keepdim=True)
        var = y.var(-1, unbiased=False, keepdim=True)
        out.append((y - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias)
    return out


def test_attention_pooling_matches_restatement() -> None:
    torch.manual_seed(0)
    pool = ExpertPooling(IN_DIMS, DIM, mode="attention", attention_dim=6).eval()
    experts = expert_inputs(4, 1)
    out = pool(experts)
    h = [x.detach() for x in projected(pool, experts)]
    u, q = pool.attention_u, pool.attention_q
    for b in range(4):
        with torch.no_grad():
            scores = [float(q.weight[0] @ torch.tanh(u.weight @ h[k][b] + u.bias))
                      for k in range(3)]
        a = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        assert_close(out.weights[b], torch.tensor(a), rtol=1e-5, atol=1e-6)
        assert_close(out.embedding[b], sum(a[k] * h[k][b] for k in range(3)),
                     rtol=1e-5, atol=1e-6)
    assert_close(out.weights.sum(1), torch.ones(4))
    # not uniform: the learned query actually weights the experts
    assert float((out.weights.detach() - 1 / 3).abs().max()) > 1e-3


def test_mean_and_concat_pooling_match_restatements() -> None:
    torch.manual_seed(1)
    experts = expert_inputs(3, 2)
    mean_pool = ExpertPooling(IN_DIMS, DIM, mode="mean").eval()
    out = mean_pool(experts)
    h = projected(mean_pool, experts)
    assert out.weights is None
    assert_close(out.embedding, (h[0] + h[1] + h[2]) / 3)

    cat_pool = ExpertPooling(IN_DIMS, DIM, mode="concat").eval()
    h = projected(cat_pool, experts)
    w, bias = cat_pool.concat_out.weight, cat_pool.concat_out.bias
    expected = bias + sum(h[k] @ w[:, k * DIM:(k + 1) * DIM].T for k in range(3))
    assert_close(cat_pool(experts).embedding, expected)
    # the stacked B x K x D form equals the list form when widths agree
    same = ExpertPooling((DIM, DIM), DIM, mode="mean").eval()
    x = torch.randn(3, 2, DIM, generator=seeded(3))
    assert_close(same(x).embedding, same([x[:, 0], x[:, 1]]).embedding)


def test_expert_dropout_rate_and_at_least_one_kept() -> None:
    p, k, batch = 0.4, 3, 4000
    pool = ExpertPooling(IN_DIMS, DIM, mode="attention", expert_dropout=p).train()
    torch.manual_seed(123)
    keep = pool.keep_mask(batch, torch.device("cpu"))
    assert bool(keep.any(1).all())
    dropped = int((~keep).sum())
    # P(drop) per expert = p - p^K / K (a sample that lost all K gets one back)
    rate = p - p**k / k
    n = batch * k
    assert abs(dropped - n * rate) < 4 * math.sqrt(n * rate * (1 - rate))
    assert abs(dropped - n * rate) < 0.05 * n * rate
    # the forward uses the same mask: dropped experts get weight exactly 0, kept ones sum to 1
    torch.manual_seed(123)
    out = pool(expert_inputs(batch, 4))
    assert torch.equal(out.weights == 0, ~keep)
    assert_close(out.weights.sum(1), torch.ones(batch))
    # evaluation keeps every expert
    assert bool(pool.eval().keep_mask(10, torch.device("cpu")).all())


def test_expert_dropout_renormalises_mean_and_concat() -> None:
    experts = expert_inputs(200, 5)
    for mode in ("mean", "concat"):
        torch.manual_seed(7)
        pool = ExpertPooling(IN_DIMS, DIM, mode=mode, expert_dropout=0.5).train()
        torch.manual_seed(8)
        keep = pool.keep_mask(200, torch.device("cpu"))
        assert not bool(keep.all())
        torch.manual_seed(8)
        out = pool(experts).embedding
        h = torch.stack(projected(pool, experts), 1) * keep.unsqueeze(-1)
        kept = keep.sum(1, keepdim=True).float()
        if mode == "mean":
            expected = h.sum(1) / kept
        else:
            expected = pool.concat_out((h * (3 / kept).unsqueeze(-1)).flatten(1))
        assert_close(out, expected)


def test_expert_pooling_absent_rows_are_finite_and_do_not_leak_gradients() -> None:
    torch.manual_seed(3)
    pool = ExpertPooling(IN_DIMS, DIM, mode="attention")
    present = torch.tensor([True, False, True, False])
    clean = expert_inputs(4, 6)
    dirty = [e.clone() for e in clean]
    for e in dirty:
        e[~present] = float("nan")
    grads = []
    for experts in (clean, dirty):
        pool.zero_grad()
        out = pool(experts, present=present)
        assert torch.isfinite(out.embedding).all()
        out.embedding[present].square().sum().backward()
        grads.append([p.grad.clone() for p in pool.parameters()])
    for g_clean, g_dirty in zip(*grads, strict=True):
        assert torch.isfinite(g_dirty).all()
        assert torch.equal(g_clean, g_dirty)


# --- TabularEncoder ------------------------------------------------------------------------
def test_tabular_fit_uses_present_training_values_only() -> None:
    numeric = torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, 30.0], [100.0, 7.0]])
    present = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    enc = TabularEncoder(2, DIM)
    enc.fit(numeric, present)
    # column 0: 1, 3, 5 -> mean 3, population std sqrt(8/3); column 1: 10, 30, 7
    assert_close(enc.mean, torch.tensor([3.0, 47.0 / 3]))
    c1 = torch.tensor([10.0, 30.0, 7.0])
    assert_close(enc.std, torch.stack([torch.tensor(math.sqrt(8 / 3)),
                                       c1.std(unbiased=False)]))
    assert bool(enc.fitted)


def test_tabular_statistics_ignore_non_training_rows() -> None:
    g = seeded(11)
    numeric = torch.randn(50, 3, generator=g) * 5 + 2
    present = torch.rand(50, 3, generator=g) > 0.2
    train = torch.arange(50) < 35
    torch.manual_seed(0)
    a = TabularEncoder(3, DIM, cardinalities=(2,))
    torch.manual_seed(0)
    b = TabularEncoder(3, DIM, cardinalities=(2,))
    a.fit(numeric[train], present[train])
    other = numeric.clone()
    other[~train] = 1e6  # the val/test rows change completely
    b.fit(other[train], present[train])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    codes = torch.zeros(15, 1, dtype=torch.long)
    assert torch.equal(a(numeric[~train], present[~train], codes),
                       b(numeric[~train], present[~train], codes))
    # fitting on all rows would give different statistics: the test can tell
    c = TabularEncoder(3, DIM, cardinalities=(2,))
    c.fit(other, present)
    assert not torch.allclose(c.mean, a.mean)


def test_tabular_missing_flags_zero_fill_and_categorical_missing_row() -> None:
    enc = TabularEncoder(2, DIM, cardinalities=(3,), embed_dim=4,
                         mean=torch.tensor([1.0, 2.0]), std=torch.tensor([2.0, 4.0]))
    captured: list[torch.Tensor] = []
    enc.mlp[0].register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    numeric = torch.tensor([[3.0, float("nan")], [float("inf"), 6.0]])
    present = torch.tensor([[True, False], [False, True]])
    codes = torch.tensor([[MISSING_CODE], [2]])
    out = enc(numeric, present, codes)
    assert torch.isfinite(out).all()
    x = captured[0]
    assert torch.equal(x[:, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # standardised, 0 fill
    assert torch.equal(x[:, 2:4], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # missing flags
    emb = enc.embeddings[0].weight
    assert torch.equal(x[0, 4:], emb[0]) and torch.equal(x[1, 4:], emb[3])
    with pytest.raises(ValueError):
        enc(numeric, present, torch.tensor([[3], [0]]))  # code == cardinality


def test_tabular_requires_fit() -> None:
    enc = TabularEncoder(1, DIM)
    with pytest.raises(RuntimeError, match="fit"):
        enc(torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool))


# --- InputFusion ---------------------------------------------------------------------------
def make_fusion(mode: str, inputs: int = 3, seed: int = 0) -> InputFusion:
    torch.manual_seed(seed)
    fusion = InputFusion(inputs, DIM, mode=mode, hidden_dim=16, num_heads=2)
    with torch.no_grad():  # non-trivial input offsets, so they are exercised
        for p in fusion.parameters():
            if p.ndim == 1 and p.abs().sum() == 0:
                p.normal_()
    return fusion.eval()


@pytest.mark.parametrize("mode", FUSION_MODES)
@pytest.mark.parametrize("garbage", ["nan", "huge", "random"])
def test_absent_inputs_change_nothing_bit_for_bit(mode: str, garbage: str) -> None:
    fusion = make_fusion(mode)
    z = torch.randn(6, 3, DIM, generator=seeded(1))
    present = mixed_mask(6, 3, 2)
    dirty = z.clone()
    fill = {"nan": torch.full_like(z, float("nan")), "huge": torch.full_like(z, 1e30),
            "random": torch.randn(6, 3, DIM, generator=seeded(9)) * 100}[garbage]
    dirty[~present] = fill[~present]
    results = []
    for x in (z, dirty):
        fusion.zero_grad()
        x = x.clone().requires_grad_()
        out = fusion(x, present)
        out.fused.square().sum().backward()
        results.append((out, x.grad, [p.grad.clone() for p in fusion.parameters()]))
    (clean, gx_clean, gp_clean), (dirt, gx_dirty, gp_dirty) = results
    assert torch.isfinite(dirt.fused).all()
    assert torch.equal(clean.fused, dirt.fused)
    if clean.weights is not None:
        assert torch.equal(clean.weights, dirt.weights)
        assert torch.equal(dirt.weights[~present], torch.zeros(int((~present).sum())))
    assert torch.equal(gx_clean, gx_dirty)
    assert torch.equal(gx_dirty[~present], torch.zeros_like(gx_dirty[~present]))
    for a, b in zip(gp_clean, gp_dirty, strict=True):
        assert torch.equal(a, b)


def test_reliability_fusion_matches_restatement() -> None:
    fusion = make_fusion("reliability")
    z = torch.randn(5, 3, DIM, generator=seeded(3), dtype=torch.float64)
    fusion = fusion.double()
    present = mixed_mask(5, 3, 4)
    bias = torch.randn(5, 3, generator=seeded(5), dtype=torch.float64)
    out = fusion(z, present, score_bias=bias)
    for b in range(5):
        idx = present[b].nonzero().flatten().tolist()
        with torch.no_grad():
            s = {m: float(fusion.scorer(z[b, m])) + float(fusion.input_bias[m])
                 + float(bias[b, m]) for m in idx}
        denom = sum(math.exp(v) for v in s.values())
        beta = torch.zeros(3, dtype=torch.float64)
        for m in idx:
            beta[m] = math.exp(s[m]) / denom
        assert_close(out.weights[b], beta)
        assert_close(out.fused[b], sum(beta[m] * z[b, m] for m in idx))
    assert_close(out.weights.sum(1), torch.ones(5, dtype=torch.float64))


def test_mean_and_concat_missing_fusion_match_restatements() -> None:
    z = torch.randn(5, 3, DIM, generator=seeded(6))
    present = mixed_mask(5, 3, 7)
    out = make_fusion("mean")(z, present)
    for b in range(5):
        idx = present[b].nonzero().flatten()
        assert_close(out.fused[b], z[b, idx].mean(0))
        assert_close(out.weights[b], present[b].float() / len(idx))

    fusion = make_fusion("concat_missing")
    out = fusion(z, present)
    lin = fusion.concat_out
    for b in range(5):
        parts = [z[b, m] if present[b, m] else fusion.missing[m] for m in range(3)]
        assert_close(out.fused[b], lin.weight @ torch.cat(parts) + lin.bias)
    # the learned missing embedding is what an absent input contributes
    changed = make_fusion("concat_missing")
    with torch.no_grad():
        changed.missing.add_(1.0)
    assert not torch.allclose(changed(z, present).fused, out.fused)


def test_transformer_fusion_equals_running_on_present_tokens_only() -> None:
    fusion = make_fusion("transformer")
    z = torch.randn(5, 3, DIM, generator=seeded(8))
    present = mixed_mask(5, 3, 9)
    out = fusion(z, present)
    assert out.weights is None
    for b in range(5):
        idx = present[b].nonzero().flatten()
        tokens = (z[b, idx] + fusion.type_embedding[idx]).unsqueeze(0)
        alone = fusion.encoder(tokens)[0].mean(0)
        assert_close(out.fused[b], alone, rtol=1e-5, atol=1e-5)
    # input-type embeddings matter: swapping two inputs' tokens changes the output
    full = torch.ones(5, 3, dtype=torch.bool)
    assert not torch.allclose(fusion(z, full).fused, fusion(z[:, [1, 0, 2]], full).fused)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_no_present_input_raises(mode: str) -> None:
    fusion = make_fusion(mode)
    present = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least one present input"):
        fusion(torch.randn(2, 3, DIM), present)
    with pytest.raises(ValueError, match="bool"):
        fusion(torch.randn(2, 3, DIM), present.float())


def test_fusion_trains_its_scorer() -> None:
    # the reliability scorer receives a gradient through the masked softmax
    fusion = make_fusion("reliability").train()
    z = torch.randn(4, 3, DIM, generator=seeded(10))
    fusion(z, mixed_mask(4, 3, 11)).fused.sum().backward()
    grad = fusion.scorer[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
