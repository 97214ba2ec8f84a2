"""DEXLayer against plain restatements of DEX's routing, frequency bias and group EMA; the
injection into a tiny timm ViT; a 2-process gloo check of the all-reduced director update."""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from midol.models.dex import (
    DEXLayer,
    dex_layers,
    director_state_dict,
    inject_dex,
    set_dex_mode,
)
from tests.helpers.dist import WORLD_SIZE

D, H, E = 8, 16, 5


def make_layer(seed: int = 0, **kwargs) -> DEXLayer:
    """A DEXLayer whose experts differ (each keeps its own random init) and have non-zero
    biases, so a wrong routing shows in the output."""
    torch.manual_seed(seed)
    layer = DEXLayer(D, H, num_experts=kwargs.pop("num_experts", E), **kwargs)
    with torch.no_grad():
        for expert in layer.experts:
            expert.fc1.bias.normal_()
            expert.fc2.bias.normal_()
        layer.router.weight.mul_(4)  # distinct, well-separated routing probabilities
    return layer


def ref_route(layer: DEXLayer, r: torch.Tensor, eps: torch.Tensor | None, freq: torch.Tensor):
    """The router, restated: logits += sigma (eps + 1 - c/sum c); softmax(./T); top-k; renorm."""
    logits = r.float() @ layer.router.weight.float().T
    if eps is not None:
        logits = logits + layer.noise_std * (eps + (1 - freq / freq.sum()))
    probs = torch.softmax(logits / layer.temperature, dim=-1)
    gates, idx = probs.topk(layer.top_k, dim=-1)
    return probs, gates / gates.sum(-1, keepdim=True), idx


def ref_omega(gates: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    omega = torch.zeros(num_experts, dtype=torch.float64)
    for b in range(gates.shape[0]):
        for k in range(gates.shape[1]):
            omega[int(idx[b, k])] += float(gates[b, k].detach())
    return omega / gates.shape[0]


# --- routing ----------------------------------------------------------------------------------
def test_router_noise_and_frequency_bias_vs_restatement() -> None:
    layer = make_layer(top_k=2).train()
    layer.noise_std = 0.7
    layer.update_director = False
    with torch.no_grad():
        layer.freq.copy_(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    freq = layer.freq.clone()
    x = torch.randn(6, 4, D)
    torch.manual_seed(11)
    layer(x)
    torch.manual_seed(11)
    eps = torch.randn(6, E)
    probs, gates, idx = ref_route(layer, x[:, 0], eps, freq)
    last = layer.last
    assert last is not None and last.probs.dtype == torch.float32
    assert_close(last.probs, probs)
    assert torch.equal(last.indices, idx)
    assert_close(last.gates, gates)
    assert_close(last.gates.sum(-1), torch.ones(6))
    # the temperature is 0.5 and the noise and bias are really there
    assert layer.temperature == 0.5
    plain = torch.softmax(x[:, 0] @ layer.router.weight.T / 0.5, dim=-1)
    assert (plain - last.probs).abs().max() > 1e-2
    # eval: no noise
    layer.eval()
    layer(x)
    assert_close(layer.last.probs, plain)


def test_image_routing_every_token_uses_its_images_experts() -> None:
    layer = make_layer(top_k=2).eval()
    x = torch.randn(7, 5, D)
    out = layer(x)
    _, gates, idx = ref_route(layer, x[:, 0], None, layer.freq)
    assert len(set(idx.flatten().tolist())) > 2  # the batch really uses several experts
    expected = torch.stack([
        sum(gates[b, k] * layer.experts[int(idx[b, k])](x[b]) for k in range(2)) for b in range(7)
    ])
    assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert layer.last.expert_out is out
    assert layer.last.director_out is None  # eval, compute_director_out=None


def test_token_routing_vs_restatement() -> None:
    layer = make_layer(top_k=2, token_routing=True).eval()
    x = torch.randn(3, 6, D)
    out = layer(x)
    tokens = x.reshape(-1, D)
    _, gates, idx = ref_route(layer, tokens, None, layer.freq)
    assert layer.last.probs.shape == (18, E) and torch.equal(layer.last.indices, idx)
    # tokens of one image go to different experts here
    assert any(len({tuple(r) for r in idx.view(3, 6, 2)[b].tolist()}) > 1 for b in range(3))
    expected = torch.stack([
        sum(gates[t, k] * layer.experts[int(idx[t, k])](tokens[t]) for k in range(2))
        for t in range(18)
    ]).view(3, 6, D)
    assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_no_prefix_token_routes_on_mean_token() -> None:
    layer = make_layer(num_prefix_tokens=0).eval()
    x = torch.randn(4, 3, D)
    layer(x)
    probs, _, _ = ref_route(layer, x.mean(1), None, layer.freq)
    assert_close(layer.last.probs, probs)


def test_gates_float32_under_bf16_autocast() -> None:
    layer = make_layer(top_k=3).eval()
    x = torch.randn(4, 3, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16  # the experts do run in bf16
    last = layer.last
    assert last.probs.dtype == torch.float32 and last.gates.dtype == torch.float32
    probs, gates, _ = ref_route(layer, x[:, 0], None, layer.freq)
    assert_close(last.probs, probs)  # float32 tolerance: no bf16 rounding in the router
    assert_close(last.gates, gates)


def test_gradients_reach_router_and_experts_not_director() -> None:
    layer = make_layer().train()
    layer(torch.randn(4, 3, D)).square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in layer.director.parameters())
    used = set(layer.last.indices.flatten().tolist())
    for e, expert in enumerate(layer.experts):
        assert (expert.fc1.weight.grad is not None) == (e in used)


# --- training statistics -------------------------------------------------------------------
def test_freq_buffer_and_group_ema_in_forward() -> None:
    layer = make_layer(top_k=2, freq_momentum=0.9).train()
    layer.noise_std = 0.5
    layer.director_momentum = 0.8
    freq = layer.freq.clone().double()
    director = {k: v.clone().double() for k, v in layer.director.state_dict().items()}
    x = torch.randn(9, 4, D)
    layer(x)
    last = layer.last
    omega = ref_omega(last.gates, last.indices, E)
    assert_close(last.omega.double(), omega)
    assert_close(last.omega.sum(), torch.tensor(1.0))
    assert_close(layer.freq.double(), 0.9 * freq + 0.1 * omega)
    for name, value in layer.director.state_dict().items():
        mix = sum(float(omega[r]) * layer.experts[r].state_dict()[name].double() for r in range(E))
        assert_close(value.double(), 0.8 * director[name] + 0.2 * mix, rtol=1e-6, atol=1e-7)
    # f_D is the director before this step's EMA
    assert last.director_out is not None
    ref = F.linear(F.gelu(F.linear(x.double(), director["fc1.weight"], director["fc1.bias"])),
                   director["fc2.weight"], director["fc2.bias"])
    assert_close(last.director_out.double(), ref, rtol=1e-5, atol=1e-6)


def test_group_ema_when_batch_uses_one_expert() -> None:
    layer = make_layer(top_k=1).train()
    layer.noise_std = 0.0
    layer.director_momentum = 0.9
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 10.0
    before = {k: v.clone().double() for k, v in layer.director.state_dict().items()}
    layer(torch.rand(5, 2, D) + 0.1)  # positive class tokens: expert 3 wins every image
    assert torch.equal(layer.last.omega, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    for name, value in layer.director.state_dict().items():
        expected = 0.9 * before[name] + 0.1 * layer.experts[3].state_dict()[name].double()
        assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


def test_no_update_in_eval_without_grad_or_when_disabled() -> None:
    layer = make_layer().train()
    freq, w = layer.freq.clone(), layer.director.fc1.weight.clone()
    x = torch.randn(4, 3, D)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert torch.equal(layer.freq, freq) and torch.equal(layer.director.fc1.weight, w)
    layer.train()
    layer.update_director = False
    layer(x)
    assert not torch.equal(layer.freq, freq) and torch.equal(layer.director.fc1.weight, w)


def test_director_mode_and_validation() -> None:
    layer = make_layer()
    x = torch.randn(2, 3, D)
    layer.mode = "director"
    assert torch.equal(layer(x), layer.director(x))
    with pytest.raises(ValueError):
        layer.mode = "dense"  # type: ignore[assignment]
    with pytest.raises(ValueError):
        DEXLayer(D, H, num_experts=2, top_k=3)


# --- injection into a timm ViT ----------------------------------------------------------------
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0)


def test_inject_dex_starts_equal_to_the_original_vit() -> None:
    vit = tiny_vit().eval()
    dex = copy.deepcopy(vit)
    layers = inject_dex(dex, num_experts=4, top_k=2)
    assert len(layers) == 2 and dex_layers(dex) == layers
    names = dict(dex.named_parameters())
    assert "blocks.1.mlp.director.fc1.weight" in names
    assert "blocks.0.mlp.experts.3.fc2.bias" in names and "blocks.0.mlp.router.weight" in names
    assert torch.equal(names["blocks.1.mlp.experts.2.fc1.weight"], vit.blocks[1].mlp.fc1.weight)
    imgs = torch.randn(3, 3, 32, 32)
    reference = vit.forward_features(imgs)
    dex.eval()
    assert_close(dex.forward_features(imgs), reference, rtol=1e-6, atol=1e-6)
    # equal experts: any routing (noise in training) gives the same output
    dex.train()
    for layer in layers:
        layer.noise_std = 1.0
    assert_close(dex.forward_features(imgs), reference, rtol=1e-5, atol=1e-6)
    set_dex_mode(dex, "director")
    assert all(layer.mode == "director" for layer in layers)
    dex.eval()
    assert_close(dex.forward_features(imgs), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", [None, [1]])
def test_director_state_dict_loads_into_plain_vit(blocks: list[int] | None) -> None:
    vit = tiny_vit()
    dex = copy.deepcopy(vit)
    layers = inject_dex(dex, blocks=blocks, num_experts=3)
    assert len(layers) == (2 if blocks is None else 1)
    # move the experts away from the director, then one training step's group EMA
    with torch.no_grad():
        for layer in layers:
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            layer.director_momentum = 0.5
    dex.train()
    dex.forward_features(torch.randn(4, 3, 32, 32))
    state = director_state_dict(dex.state_dict())
    assert not any(k for k in state if ".experts." in k or ".router." in k or k.endswith(".freq"))
    plain = tiny_vit()
    plain.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    set_dex_mode(dex, "director")
    dex.eval()
    plain.eval()
    exported = plain.forward_features(imgs)
    assert torch.equal(exported, dex.forward_features(imgs))
    assert (exported - vit.eval().forward_features(imgs)).abs().max() > 1e-3  # director moved


# --- distributed ----------------------------------------------------------------------------
LOCAL_B = 4


def dist_inputs() -> torch.Tensor:
    # Global batch: rank 0 holds images 0-3, rank 1 images 4-7; the halves route differently.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD_SIZE * LOCAL_B, 3, D, generator=g)
    x[LOCAL_B:, 0] += 2.0
    return x


def dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        layer = make_layer(top_k=2, freq_momentum=0.9).train()
        layer.noise_std = 0.0  # per-rank noise would differ from the single process's draw
        layer.director_momentum = 0.7
        x = dist_inputs()[rank * LOCAL_B:(rank + 1) * LOCAL_B]
        for _ in range(2):
            layer(x)
        torch.save({"director": layer.director.state_dict(), "freq": layer.freq,
                    "omega": layer.last.omega}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available()
                    or "fork" not in mp.get_all_start_methods(), reason="needs gloo and fork")
def test_distributed_director_update_equals_whole_batch(tmp_path: Path) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    # fork, not spawn: a spawned child re-imports torch, timm and midol (seconds each)
    mp.start_processes(dist_worker, args=(WORLD_SIZE, str(tmp_path / "pg_init"), str(tmp_path)),
                       nprocs=WORLD_SIZE, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    def run(x: torch.Tensor) -> DEXLayer:
        layer = make_layer(top_k=2, freq_momentum=0.9).train()
        layer.noise_std = 0.0
        layer.director_momentum = 0.7
        for _ in range(2):
            layer(x)
        return layer

    whole = run(dist_inputs())
    for res in results:
        assert_close(res["omega"], whole.last.omega)
        assert_close(res["freq"], whole.freq)
        for name, value in whole.director.state_dict().items():
            assert_close(res["director"][name], value)
    # ...and it is not what rank 0's half alone would give (the all-reduce matters)
    half = run(dist_inputs()[:LOCAL_B])
    assert (half.last.omega - whole.last.omega).abs().max() > 1e-2
