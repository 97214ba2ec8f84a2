"""DEXLayer's dispatches (issue 30): ``sorted``, ``dense`` and ``grouped`` give the ``loop``'s output
and gradients (several seeds, top-1 and top-2, image and token routing, routing noise on), the
host read-backs each makes per block (the sync audit the GPU suite uses), and that a dense DEX
ViT (a grouped one in bf16) compiles as one graph."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from experiments.benchmarks.sync_audit import SyncAudit
from midol.models.dex import DISPATCHES, DEXLayer, dex_layers, inject_dex, set_dex_dispatch

D, H, E = 8, 16, 5


def make_layer(seed: int, **kwargs) -> DEXLayer:
    """Experts that differ (own init, non-zero biases) so a row sent to a wrong expert shows."""
    torch.manual_seed(seed)
    layer = DEXLayer(D, H, num_experts=E, **kwargs)
    with torch.no_grad():
        for expert in layer.experts:
            expert.fc1.bias.normal_()
            expert.fc2.bias.normal_()
        layer.router.weight.mul_(4)
    return layer


def run(layer: DEXLayer, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter's gradient (None -> absent) of ``(out * w).sum()``."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same routing noise for every dispatch
    out = layer(x)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert x.grad is not None
    grads["input"] = x.grad
    return out.detach(), grads


@pytest.mark.parametrize("token_routing", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sorted_and_dense_equal_loop_output_and_gradients(seed: int, top_k: int,
                                                          token_routing: bool) -> None:
    base = make_layer(seed, top_k=top_k, token_routing=token_routing).train()
    base.noise_std = 0.7
    x = torch.randn(6, 4, D, generator=torch.Generator().manual_seed(100 + seed))
    ref_out, ref_grads = run(base, x, seed)
    ref_probs = base.last.probs if base.last else None
    for dispatch in ("sorted", "dense", "grouped"):
        layer = make_layer(seed, top_k=top_k, token_routing=token_routing, dispatch=dispatch).train()
        layer.noise_std = 0.7
        out, grads = run(layer, x, seed)
        assert layer.last is not None and ref_probs is not None
        assert_close(layer.last.probs, ref_probs, rtol=0, atol=0)  # same routing
        assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        # dense, grouped: zero gradients where no row chose an expert (loop: None)
        assert set(grads) >= set(ref_grads)
        for name, g in grads.items():
            expected = ref_grads.get(name, torch.zeros_like(g))
            assert_close(g, expected, rtol=1e-5, atol=1e-6, msg=f"{dispatch} {name}")
        # the freq buffer is updated from the same shares
        assert_close(layer.freq, base.freq, rtol=0, atol=0)


def test_output_is_the_gate_weighted_sum_of_the_chosen_experts() -> None:
    """Against a plain restatement, not only against the loop: out_b = sum_k g_bk E_{i_bk}(x_b)."""
    for dispatch in DISPATCHES:
        layer = make_layer(3, top_k=2, dispatch=dispatch).eval()
        x = torch.randn(5, 3, D)
        out = layer(x)
        last = layer.last
        assert last is not None
        for b in range(5):
            want = sum(last.gates[b, k] * layer.experts[int(last.indices[b, k])](x[b]) for k in range(2))
            assert_close(out[b], want, rtol=1e-5, atol=1e-6)


def test_dense_and_grouped_give_an_unchosen_expert_zero_gradient_where_loop_gives_none() -> None:
    x = torch.randn(1, 3, D)
    grads = {}
    for dispatch in DISPATCHES:
        layer = make_layer(0, top_k=1, dispatch=dispatch).eval()
        layer(x).sum().backward()
        grads[dispatch] = [e.fc1.weight.grad for e in layer.experts]
    chosen = [g is not None for g in grads["loop"]]
    assert sum(chosen) == 1  # one image, top-1
    assert [g is not None for g in grads["sorted"]] == chosen
    for static in ("dense", "grouped"):  # no read-back: every expert is in the graph
        for g_loop, g_static in zip(grads["loop"], grads[static], strict=True):
            assert g_static is not None
            if g_loop is None:
                assert torch.count_nonzero(g_static) == 0
            else:
                assert_close(g_static, g_loop)


@pytest.mark.parametrize(("dispatch", "per_block"),
                         [("loop", E), ("sorted", 1), ("dense", 0), ("grouped", 0)])
def test_host_reads_per_forward(dispatch: str, per_block: int) -> None:
    """The audit's count of device-to-host reads in one forward + backward of a layer (update
    deferred, as DEX runs it): loop one per expert (``nonzero``), sorted one, dense and grouped
    none."""
    layer = make_layer(0, top_k=2, dispatch=dispatch).train()
    layer.defer_updates = True
    x = torch.randn(8, 4, D, requires_grad=True)
    with SyncAudit() as audit:
        layer(x).sum().backward()
    assert audit.report.total == per_block, audit.report.lines()


def test_bad_dispatch_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown DEX dispatch 'scatter'.*loop"):
        DEXLayer(D, H, dispatch="scatter")  # type: ignore[arg-type]
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    inject_dex(vit, num_experts=3)
    with pytest.raises(ValueError, match="unknown DEX dispatch"):
        set_dex_dispatch(vit, "where")  # type: ignore[arg-type]


def test_dense_dex_vit_compiles_as_one_graph() -> None:
    """A DEX ViT in training (noise, deferred updates) with dense dispatch: dynamo traces the
    forward without a graph break; the loop breaks at its ``torch.where``."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=0)
    inject_dex(vit, num_experts=3, top_k=2)
    for layer in dex_layers(vit):
        layer.defer_updates = True
    x = torch.randn(2, 3, 16, 16)
    vit.train()
    set_dex_dispatch(vit, "dense")
    dense = torch._dynamo.explain(copy.deepcopy(vit))(x)
    assert dense.graph_break_count == 0 and dense.graph_count == 1, dense.break_reasons
    set_dex_dispatch(vit, "loop")
    loop = torch._dynamo.explain(copy.deepcopy(vit))(x)
    assert loop.graph_break_count > 0


def test_compiled_dense_vit_equals_eager_and_does_not_recompile_as_noise_decays() -> None:
    """sigma_t changes every step (cosine schedule); it is read as a tensor, so one graph serves
    every step, and the compiled steps (dynamo's eager backend: the same kernels) match eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=0)
    inject_dex(vit, num_experts=3, top_k=2, dispatch="dense")
    for layer in dex_layers(vit):
        layer.defer_updates = True
    eager = copy.deepcopy(vit).train()
    compiled = copy.deepcopy(vit).train()
    compiled.compile(dynamic=False, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    for step in range(4):
        outs = []
        for model in (eager, compiled):
            for layer in dex_layers(model):
                layer.noise_std = 1.0 - 0.2 * step
            torch.manual_seed(step)
            out = model(x)
            out.sum().backward()
            for layer in dex_layers(model):
                assert layer.commit()
            outs.append(out.detach())
        assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(dex_layers(eager), dex_layers(compiled), strict=True):
        assert_close(b.freq, a.freq)
        assert_close(b.director.fc1.weight, a.director.fc1.weight)


def test_grouped_under_bf16_autocast_matches_loop_and_traces_as_one_graph() -> None:
    """Under bf16 autocast (how DEX trains on a GPU) the grouped GEMMs run in bf16 as the
    loop's nn.Linear do: equal to bf16 rounding; and the layer traces without a break."""
    x = torch.randn(6, 4, 32)
    outs = {}
    for dispatch in ("loop", "grouped"):
        torch.manual_seed(0)
        layer = DEXLayer(32, 64, num_experts=4, top_k=2, dispatch=dispatch).train()
        layer.defer_updates = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            outs[dispatch] = layer(x)
            assert outs[dispatch].dtype == torch.bfloat16
            if dispatch == "grouped":
                explained = torch._dynamo.explain(layer)(x)
                assert explained.graph_break_count == 0, explained.break_reasons
    assert_close(outs["grouped"].float(), outs["loop"].float(), rtol=2e-2, atol=2e-2)


def test_grouped_needs_aligned_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by 8, got 12 and 16"):
        DEXLayer(12, 16, dispatch="grouped")
