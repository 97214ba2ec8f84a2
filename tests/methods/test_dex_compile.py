"""DEX's dispatch and compile options (issue 30 item 4): the dense dispatch gives the loop's
loss and gradients through the whole training step; with it (or without DEX layers) the whole
differentiable step traces as one graph and ``compile: true`` compiles it (fullgraph, dynamo's
eager backend on a CPU); state dicts keep their keys."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from tests.helpers.dex import tiny_dex

BATCH = 6


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"views": [torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)]}


def step(model, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and gradients (outside Lightning), then the deferred commits."""
    model.train()
    model._total_steps = 10
    torch.manual_seed(seed)  # the same masking and routing noise
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        out = model.training_step(batch(), 0)
    assert out is not None
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for layer in model.dex_layers():
        layer.commit()
    model.zero_grad(set_to_none=True)
    return out["loss"].detach(), grads


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
@pytest.mark.parametrize("token_routing", [False, True])
def test_dense_step_equals_loop_step(token_routing: bool, dispatch: str) -> None:
    torch.manual_seed(0)
    loop = tiny_dex(token_routing=token_routing)
    torch.manual_seed(0)
    dense = tiny_dex(token_routing=token_routing, dex_dispatch=dispatch)
    for s in range(2):  # the second step after the first's director and frequency updates
        l_loop, g_loop = step(loop, s)
        l_dense, g_dense = step(dense, s)
        assert_close(l_dense, l_loop, rtol=1e-6, atol=1e-6)
        assert set(g_dense) >= set(g_loop)
        for name, g in g_dense.items():
            assert_close(g, g_loop.get(name, torch.zeros_like(g)), rtol=1e-5, atol=1e-6, msg=name)
    assert_close(dense.vit.blocks[0].mlp.director.fc1.weight, loop.vit.blocks[0].mlp.director.fc1.weight)


def _explain(model):
    model.train()
    images = torch.randn(BATCH, 3, 32, 32)
    from midol.models.mae import random_masking

    m = random_masking(BATCH, 16, 0.75, images.device)
    return torch._dynamo.explain(model.step_module)(images, m.keep, m.restore, m.mask,
                                                    model.block_alpha)


@pytest.mark.parametrize("options", [{"dex_dispatch": "dense"}, {"use_dex": False}])
def test_whole_step_traces_as_one_graph(options: dict) -> None:
    model = tiny_dex(**options)
    explained = _explain(model)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert model.resolved_compile_scope() == "model"
    assert model.compile_targets() == [model.step_module]


def test_loop_breaks_the_graph_and_compiles_the_decoder_by_default() -> None:
    model = tiny_dex()
    assert _explain(model).graph_break_count > 0
    assert model.resolved_compile_scope() == "decoder"
    assert model.compile_targets() == [model.decoder]
    assert tiny_dex(dex_dispatch="grouped").resolved_compile_scope() == "model"
    forced = tiny_dex(compile_scope="model")
    assert forced.compile_targets() == [forced.step_module]


def test_compile_true_compiles_the_whole_step_as_one_graph(monkeypatch) -> None:
    """``compile: true`` through BaseMethod.configure_model, with fullgraph forced (a graph
    break would raise) and dynamo's eager backend (no C++ compiler on a CPU): equal to eager."""
    from torch._dynamo.utils import counters

    original = torch.nn.Module.compile

    def strict(self, *args, **kwargs):
        return original(self, *args, backend="eager", fullgraph=True, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", strict)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = tiny_dex(dex_dispatch="dense")
    torch.manual_seed(0)
    compiled = tiny_dex(dex_dispatch="dense", compile=True)
    compiled.configure_model()
    assert compiled.step_module._compiled_call_impl is not None
    for s in range(3):
        for model in (eager, compiled):  # sigma_t decays: one graph must serve every step
            for layer in model.dex_layers():
                layer.noise_std = 1.0 - 0.3 * s
        l_eager, g_eager = step(eager, s)
        l_comp, g_comp = step(compiled, s)
        assert_close(l_comp, l_eager, rtol=1e-6, atol=1e-6)
        for name, g in g_eager.items():
            assert_close(g_comp[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] == 1


def test_state_dict_keys_do_not_include_the_step_module() -> None:
    model = tiny_dex(dex_dispatch="dense")
    keys = set(model.state_dict())
    assert not any(k.startswith("step_module.") or "block_alpha" in k for k in keys)
    assert model.step_module.vit is model.vit and model.step_module.decoder is model.decoder
    assert "step_module" not in dict(model.named_children())


@pytest.mark.parametrize(("option", "value", "match"), [
    ("dex_dispatch", "scatter", "dex_dispatch must be one of"),
    ("compile_scope", "encoder", "compile_scope must be"),
])
def test_bad_options_name_the_choices(option: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_dex(**{option: value})
