"""midol's ``authors`` switches equal a plain restatement of the released M-IDoL code
(github LYH-hh/M-IDoL at cacb728: MoEHead/MoEMlp of ``MIDoL_model.py`` over the patched Tutel
``moe_layer.py``; ``_sinkhorn_knopp`` of ``main_MoE_Uni.py``; DINO's ``utils.clip_gradients``).
The restatements below are ours, written from reading that code, on random inputs and on one
real batch of the bundled sample images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midol.losses import log_balanced_routing
from midol.models import MoEProjector
from midol.optim.clipping import clip_grad_norm_per_param
from tests.helpers.sinkhorn_reference import authors_reference
from tests.helpers.tiny import tiny_datamodule, tiny_module


def tutel_head(proj: MoEProjector, x: torch.Tensor, gate_noise: float, training: bool,
               noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MoEHead.forward with top_value = E experts, normalize_gate=False, fp32 bias-free gate:
    logits = W_g x; noisy = logits + gate_noise * randn / E (training only); scores =
    softmax(noisy); y = sum_e scores_e * ffn_e(x); out = last_layer(normalize(y)); the
    noise-free logits are returned for the routing loss."""
    E = proj.num_experts
    logits = x.float() @ proj.router.weight.float().T
    noisy = logits
    if training and gate_noise > 0:
        torch.manual_seed(noise_seed)
        noisy = logits + gate_noise * torch.randn_like(logits) / E
    scores = F.softmax(noisy, dim=1)
    bank = proj.experts
    y = torch.zeros(x.shape[0], bank.weights[-1].shape[-1])
    for e in range(E):
        h = F.gelu(x @ bank.weights[0][e] + bank.biases[0][e])
        h = h @ bank.weights[1][e] + bank.biases[1][e]
        y = y + scores[:, e : e + 1] * h
    y = F.normalize(y, dim=-1, p=2)
    w = proj.projection.weight_v / proj.projection.weight_v.norm(dim=1, keepdim=True)
    return y @ w.T, logits


def authors_projector(in_dim: int, gate_noise: float) -> MoEProjector:
    torch.manual_seed(3)
    proj = MoEProjector(in_dim, num_experts=4, top_k=4, hidden_dim=24, bottleneck_dim=in_dim,
                        out_dim=32, gate_noise=gate_noise, router_bias=False)
    for b in proj.experts.biases:
        torch.nn.init.normal_(b, std=0.1)  # non-zero, so a dropped bias would show
    return proj


def run_ours(proj: MoEProjector, x: torch.Tensor, training: bool, noise_seed: int):
    proj.train(training)
    torch.manual_seed(noise_seed)
    return proj(x)


def real_features() -> torch.Tensor:
    """Pooled features of 8 real sample images (X-ray and pathology) from a tiny Swin."""
    dm = tiny_datamodule(batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = tiny_module()
    with torch.no_grad():
        return module.student["backbone"](module.normalizer(batch["views"][0]))


@pytest.mark.parametrize("source", ["random", "real"])
@pytest.mark.parametrize("training,gate_noise", [(False, 1.0), (True, 0.0), (True, 1.0)])
def test_dense_four_expert_head_equals_released_code(source, training, gate_noise) -> None:
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(0)) if source == "random" \
        else real_features()
    proj = authors_projector(x.shape[1], gate_noise)
    assert proj.router.bias is None  # Tutel's router has no bias
    ours = run_ours(proj, x, training, noise_seed=7)
    ref_out, ref_logits = tutel_head(proj, x, gate_noise, training, noise_seed=7)
    torch.testing.assert_close(ours.representation, ref_out, atol=2e-6, rtol=1e-5)
    # the routing loss sees the noise-free logits, also when the gate was noised
    torch.testing.assert_close(ours.router_logits, ref_logits, atol=1e-6, rtol=1e-5)


def test_gate_noise_changes_training_output_only() -> None:
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    proj = authors_projector(16, gate_noise=1.0)
    noisy = run_ours(proj, x, True, noise_seed=7).representation
    clean, _ = tutel_head(proj, x, 0.0, False, noise_seed=7)
    assert (noisy - clean).abs().max() > 1e-4  # std 1/E on the logits moves the mixture
    torch.testing.assert_close(run_ours(proj, x, False, 7).representation, clean, atol=2e-6,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="gate_noise"):
        MoEProjector(16, num_experts=4, gate_noise=-1.0)


def test_teacher_in_train_mode_gets_gate_noise_eval_teacher_does_not() -> None:
    for mode, noised in (("train", True), ("eval", False)):
        module = tiny_module(num_experts=4, top_k=4, gate_noise=1.0, router_bias=False,
                             teacher_mode=mode)
        module.train()
        head = module.teacher["projector"]
        assert head.training is noised
        x = torch.randn(6, head.router.in_features)
        torch.manual_seed(0)
        a = head(x).representation
        torch.manual_seed(1)
        b = head(x).representation
        assert (not torch.allclose(a, b)) is noised


def dino_clip_gradients(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """DINO utils.clip_gradients: per tensor, coef = clip / (||g|| + 1e-6), applied if < 1."""
    out = []
    for g in grads:
        coef = clip / (float(g.norm(2)) + 1e-6)
        out.append(g * coef if coef < 1 else g.clone())
    return out


def test_per_param_clipping_equals_dino_on_random_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(5, 7), (3,), (11, 2, 2), (4,)]]
    for p, scale in zip(params, [10.0, 0.01, 3.0, 1.0]):
        p.grad = torch.randn(p.shape, generator=g) * scale
    expected = dino_clip_gradients([p.grad for p in params], 3.0)
    clip_grad_norm_per_param(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert float(params[0].grad.norm()) == pytest.approx(3.0, rel=1e-5)  # clipped
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_per_param(params, 0.0)


def test_per_param_clipping_on_a_real_batch_through_the_module() -> None:
    """The module's ``clip_mode: per_param`` hook on the gradients of one real training step."""
    dm = tiny_datamodule(batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = tiny_module(clip_mode="per_param", sinkhorn_impl="authors")
    views = [module.normalizer(v) for v in batch["views"]]
    feats = module.student["backbone"](torch.cat(views[:2]))
    module.student["projector"](feats).representation.pow(2).sum().mul(100).backward()
    params = [p for p in module.student.parameters() if p.grad is not None]
    expected = dino_clip_gradients([p.grad for p in params], 0.5)
    assert any(float(p.grad.norm()) > 0.5 for p in params)  # the clip does something
    optimizer = torch.optim.SGD(params, lr=0.1)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_authors_sinkhorn_on_real_teacher_logits() -> None:
    x = real_features()
    proj = authors_projector(x.shape[1], gate_noise=0.0).eval()
    with torch.no_grad():
        logits = proj(x).router_logits.double() / 0.04
    ours = log_balanced_routing(logits, 0.05, 3, "authors")
    np.testing.assert_allclose(ours.exp().numpy(), np.exp(authors_reference(logits.numpy(), 0.05, 3)),
                               atol=2e-6)
