"""MoE projector: routing, gradients, equality with a per-expert loop."""

import pytest
import torch
import torch.nn.functional as F

from midol.models import ExpertBank, MoEProjector, NormedLinear


def loop_expert(bank: ExpertBank, i: int, x: torch.Tensor) -> torch.Tensor:
    """Expert i as an ordinary stack of Linear + GELU layers."""
    h = x
    for layer, (w, b) in enumerate(zip(bank.weights, bank.biases)):
        h = h @ w[i] + b[i]
        if layer < len(bank.weights) - 1:
            h = F.gelu(h)
    return h


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_expert_bank_equals_independent_ffns(num_layers):
    torch.manual_seed(0)
    bank = ExpertBank(4, 12, 20, 7, num_layers)
    for b in bank.biases:
        torch.nn.init.normal_(b)
    x = torch.randn(9, 12)
    out = bank(x)
    assert out.shape == (4, 9, 7)
    for i in range(4):
        torch.testing.assert_close(out[i], loop_expert(bank, i, x))


def test_top1_output_is_selected_expert_then_projection():
    torch.manual_seed(1)
    proj = MoEProjector(16, num_experts=5, hidden_dim=24, bottleneck_dim=8, out_dim=32)
    x = torch.randn(11, 16)
    out = proj(x)
    expected_index = (x @ proj.router.weight.T + proj.router.bias).argmax(dim=1)
    assert torch.equal(out.expert_index[:, 0], expected_index)
    for b in range(11):
        h = F.normalize(loop_expert(proj.experts, int(expected_index[b]), x[b : b + 1]), dim=-1)
        w = proj.projection.weight_v / proj.projection.weight_v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(out.representation[b : b + 1], h @ w.T)


def test_top1_only_selected_expert_receives_gradient():
    torch.manual_seed(2)
    proj = MoEProjector(16, num_experts=6, hidden_dim=24, bottleneck_dim=8, out_dim=32)
    x = torch.randn(3, 16)
    out = proj(x)
    out.representation.pow(2).sum().backward()
    selected = set(out.expert_index[:, 0].tolist())
    assert len(selected) < 6  # 3 images cannot use all 6 experts
    for w in list(proj.experts.weights) + list(proj.experts.biases):
        has_grad = w.grad.flatten(1).abs().sum(dim=1) > 0
        assert set(torch.nonzero(has_grad).flatten().tolist()) == selected
    # Without gate weighting the router gets no gradient from the representation (Eq. 11).
    assert proj.router.weight.grad is None or proj.router.weight.grad.abs().sum() == 0


def test_gate_weighted_output_scales_by_probability_and_trains_router():
    torch.manual_seed(3)
    plain = MoEProjector(16, num_experts=4, hidden_dim=24, bottleneck_dim=8, out_dim=32, l2_norm=False, projection="linear")
    gated = MoEProjector(16, num_experts=4, hidden_dim=24, bottleneck_dim=8, out_dim=32, l2_norm=False, projection="linear", gate_weighted_output=True)
    gated.load_state_dict(plain.state_dict())
    x = torch.randn(5, 16)
    p = plain.router(x).softmax(-1).max(-1).values
    torch.testing.assert_close(gated(x).representation, plain(x).representation * p[:, None])
    gated(x).representation.sum().backward()
    assert gated.router.weight.grad.abs().sum() > 0


def test_top2_mixes_renormalised_gates():
    torch.manual_seed(4)
    proj = MoEProjector(8, num_experts=4, top_k=2, hidden_dim=16, bottleneck_dim=6, out_dim=10, l2_norm=False, projection="linear")
    x = torch.randn(7, 8)
    out = proj(x)
    probs = proj.router(x).softmax(-1)
    top, idx = probs.topk(2, dim=-1)
    gates = top / top.sum(-1, keepdim=True)
    every = proj.experts(x)
    for b in range(7):
        h = gates[b, 0] * every[idx[b, 0], b] + gates[b, 1] * every[idx[b, 1], b]
        torch.testing.assert_close(out.representation[b], proj.projection(h))


def test_single_expert_has_no_router():
    proj = MoEProjector(8, num_experts=1, hidden_dim=16, bottleneck_dim=6, out_dim=10)
    out = proj(torch.randn(3, 8))
    assert proj.router is None and out.router_logits is None
    assert out.expert_index.eq(0).all()


@pytest.mark.parametrize("kwargs", [{"num_experts": 0}, {"num_experts": 3, "top_k": 4}, {"projection": "mlp"}])
def test_bad_projector_arguments(kwargs):
    with pytest.raises(ValueError):
        MoEProjector(8, **kwargs)


def test_normed_linear_rows_have_unit_norm_when_frozen():
    layer = NormedLinear(6, 9, norm_frozen=True)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(9))
    assert [n for n, _ in layer.named_parameters()] == ["weight_v"]
    free = NormedLinear(6, 9, norm_frozen=False)
    assert {n for n, _ in free.named_parameters()} == {"weight_v", "weight_g"}


def test_router_noise_only_in_training_mode():
    torch.manual_seed(5)
    proj = MoEProjector(8, num_experts=4, hidden_dim=16, bottleneck_dim=6, out_dim=10, router_noise=1.0)
    x = torch.randn(64, 8)
    with torch.no_grad():
        clean = proj.router(x)
        proj.train()
        noisy = proj(x).router_logits
    assert float((noisy - clean).std()) == pytest.approx(1.0, abs=0.15)
    proj.eval()
    with torch.no_grad():
        torch.testing.assert_close(proj(x).router_logits, clean)
    with pytest.raises(ValueError):
        MoEProjector(8, router_noise=-1.0)


def test_gate_weighted_output_trains_the_router_through_the_default_l2_norm_head():
    """With the default head (L2 norm + weight-normalised layer) the gate must survive the
    norm: output = l(p_i * e_i(h) / ||e_i(h)||). In 0.1.0 the norm cancelled it (router
    gradient ~1e-17)."""
    torch.manual_seed(0)
    moe = MoEProjector(16, num_experts=4, hidden_dim=24, bottleneck_dim=8, out_dim=32,
                       gate_weighted_output=True)
    x = torch.randn(6, 16)
    out = moe(x)
    probs = moe.router(x).softmax(-1)
    p, i = probs.max(-1)
    experts = moe.experts(x)  # N x B x E
    e = experts[i, torch.arange(6)]
    expected = moe.projection(F.normalize(e, dim=-1) * p.unsqueeze(-1))
    torch.testing.assert_close(out.representation, expected)
    out.representation.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 1e-4
