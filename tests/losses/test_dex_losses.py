"""DEX losses, the group EMA and the MAE loss against plain float64 restatements."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Mlp
from torch.testing import assert_close

from midol.losses.dex import balance_loss, coherence_loss, layer_weights, weighted_layer_mean
from midol.losses.mae import masked_mae_loss, patchify, unpatchify
from midol.models.ema import group_ema_


# --- L_bal ---------------------------------------------------------------------------------
def ref_balance(probs: torch.Tensor) -> float:
    rows, experts = probs.shape
    total = 0.0
    for e in range(experts):
        pbar = sum(float(probs[b, e]) for b in range(rows)) / rows
        total += pbar * pbar
    return experts * total


@pytest.mark.parametrize("rows,experts", [(1, 2), (7, 8), (16, 3)])
def test_balance_loss_value_and_gradient(rows: int, experts: int) -> None:
    g = torch.Generator().manual_seed(rows * 10 + experts)
    probs = torch.randn(rows, experts, generator=g).mul(2).softmax(-1).requires_grad_()
    loss = balance_loss(probs)
    expected_loss = torch.tensor(ref_balance(probs.detach().double()), dtype=torch.float64)
    assert_close(loss.double(), expected_loss)
    loss.backward()
    # stop-gradient on one factor: d/dp_be = E * Pbar_e / B, the same for every row
    expected = experts * probs.detach().mean(0) / rows
    assert_close(probs.grad, expected.expand(rows, experts))


def test_balance_loss_bounds() -> None:
    assert_close(balance_loss(torch.full((5, 4), 0.25)), torch.tensor(1.0))
    one_hot = torch.zeros(5, 4)
    one_hot[:, 2] = 1
    assert_close(balance_loss(one_hot), torch.tensor(4.0))
    with pytest.raises(ValueError):
        balance_loss(torch.zeros(0, 4))


# --- L_co ----------------------------------------------------------------------------------
def ref_coherence_ce(f_e: torch.Tensor, f_d: torch.Tensor, td: float, te: float) -> float:
    rows = f_e.reshape(-1, f_e.shape[-1]).double()
    targets = f_d.reshape(-1, f_d.shape[-1]).double()
    total = 0.0
    for fe, fd in zip(rows, targets):
        zd = sum(math.exp(float(v) / td) for v in fd)
        ze = sum(math.exp(float(v) / te) for v in fe)
        for d in range(fe.numel()):
            q = math.exp(float(fd[d]) / td) / zd
            total -= q * (float(fe[d]) / te - math.log(ze))
    return total / rows.shape[0]


def ref_coherence_cosine(f_e: torch.Tensor, f_d: torch.Tensor) -> float:
    rows = f_e.reshape(-1, f_e.shape[-1]).double()
    targets = f_d.reshape(-1, f_d.shape[-1]).double()
    total = 0.0
    for fe, fd in zip(rows, targets):
        total += 1 - float((fe * fd).sum()) / (float(fe.norm()) * float(fd.norm()))
    return total / rows.shape[0]


@pytest.mark.parametrize("td,te", [(0.5, 1.0), (0.1, 0.3), (1.0, 1.0)])
def test_coherence_ce_vs_restatement(td: float, te: float) -> None:
    g = torch.Generator().manual_seed(int(td * 100 + te * 10))
    f_e = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    f_d = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    loss = coherence_loss(f_e, f_d, "ce", director_temperature=td, expert_temperature=te)
    assert_close(loss.double(), torch.tensor(ref_coherence_ce(f_e.detach(), f_d.detach(), td, te),
                                             dtype=torch.float64), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert f_d.grad is None  # the director side is detached
    assert f_e.grad is not None and f_e.grad.abs().sum() > 0


def test_coherence_defaults_are_authors_temperatures() -> None:
    g = torch.Generator().manual_seed(0)
    f_e, f_d = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    assert_close(coherence_loss(f_e, f_d).double(),
                 torch.tensor(ref_coherence_ce(f_e, f_d, 0.5, 1.0), dtype=torch.float64),
                 rtol=1e-5, atol=1e-6)


def test_coherence_cosine_vs_restatement() -> None:
    g = torch.Generator().manual_seed(1)
    f_e = torch.randn(4, 3, 7, generator=g, requires_grad=True)
    f_d = torch.randn(4, 3, 7, generator=g, requires_grad=True)
    loss = coherence_loss(f_e, f_d, "cosine")
    assert_close(loss.double(), torch.tensor(ref_coherence_cosine(f_e.detach(), f_d.detach()),
                                             dtype=torch.float64), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert f_d.grad is None
    # aligned features give zero; bf16 inputs are computed in float32
    assert_close(coherence_loss(f_d.detach() * 3, f_d.detach(), "cosine"), torch.tensor(0.0),
                 atol=1e-6, rtol=0)
    assert coherence_loss(f_e.bfloat16(), f_d.bfloat16(), "cosine").dtype == torch.float32
    with pytest.raises(ValueError):
        coherence_loss(f_e, f_d, "l2")  # type: ignore[arg-type]


# --- block weights ---------------------------------------------------------------------------
def test_layer_weights() -> None:
    assert_close(layer_weights(12), torch.tensor([1 / (12 - layer + 1) for layer in range(1, 13)]))
    assert_close(layer_weights(1), torch.tensor([1.0]))
    w = layer_weights(12)
    assert w[0] == pytest.approx(1 / 12) and w[-1] == 1.0


def test_weighted_layer_mean_vs_restatement() -> None:
    values = [torch.tensor(v) for v in (0.3, 1.2, 2.0, 0.7)]
    expected = sum(float(v) / (4 - i) for i, v in enumerate(values)) / 4  # alpha_l = 1/(L-l+1)
    assert_close(weighted_layer_mean(values), torch.tensor(expected))
    with pytest.raises(ValueError):
        weighted_layer_mean([])


# --- group EMA --------------------------------------------------------------------------------
@pytest.mark.parametrize("omega", [[0.5, 0.0, 0.3, 0.2], [0.0, 1.0, 0.0, 0.0]])
def test_group_ema_formula(omega: list[float]) -> None:
    torch.manual_seed(0)
    director = Mlp(6, 10).requires_grad_(False)
    experts = [Mlp(6, 10) for _ in range(4)]
    before = {k: v.clone().double() for k, v in director.state_dict().items()}
    m = 0.9
    group_ema_(director, experts, torch.tensor(omega), m)
    for name, value in director.state_dict().items():
        mix = sum(w * experts[r].state_dict()[name].double() for r, w in enumerate(omega))
        assert_close(value.double(), m * before[name] + (1 - m) * mix, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for e in experts for p in e.parameters())
    with pytest.raises(ValueError):
        group_ema_(director, experts, torch.ones(3) / 3, m)


@pytest.mark.parametrize("omega", [[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5]])
def test_group_ema_without_host_sync_equals_the_skipping_update(omega: list[float], monkeypatch) -> None:
    """Issue 30 item 4: the device-side update (no read-back of the shares) gives the same
    director to float rounding, and reads nothing back to the host."""
    torch.manual_seed(0)
    experts = [Mlp(6, 10) for _ in range(4)]
    skipping, sync_free = Mlp(6, 10).requires_grad_(False), Mlp(6, 10).requires_grad_(False)
    sync_free.load_state_dict(skipping.state_dict())
    group_ema_(skipping, experts, torch.tensor(omega), 0.9, sync_free=False)

    def no_readback(*args, **kwargs):
        raise AssertionError("a host read-back in the sync-free group EMA")

    monkeypatch.setattr(torch.Tensor, "tolist", no_readback)
    monkeypatch.setattr(torch.Tensor, "item", no_readback)
    group_ema_(sync_free, experts, torch.tensor(omega), 0.9, sync_free=True)
    monkeypatch.undo()
    for (name, a), b in zip(skipping.state_dict().items(), sync_free.state_dict().values()):
        assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


# --- MAE --------------------------------------------------------------------------------------
def ref_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, _, h, w = imgs.shape
    rows = []
    for n in range(b):
        patches = []
        for i in range(h // p):
            for j in range(w // p):
                tile = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # C x p x p
                patches.append(tile.permute(1, 2, 0).reshape(-1))  # (row, col, channel)
        rows.append(torch.stack(patches))
    return torch.stack(rows)


def test_patchify_vs_restatement_and_round_trip() -> None:
    imgs = torch.randn(2, 3, 8, 12)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches, ref_patchify(imgs, 4))
    assert torch.equal(unpatchify(patches, 4, 8, 12), imgs)
    with pytest.raises(ValueError):
        patchify(imgs, 5)


def ref_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    num, den = 0.0, 0.0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            t = target[b, i].double()
            if norm_pix:
                mean = float(t.mean())
                var = sum((float(v) - mean) ** 2 for v in t) / (t.numel() - 1)
                t = (t - mean) / math.sqrt(var + 1e-6)
            err = float(((pred[b, i].double() - t) ** 2).mean())
            num += float(mask[b, i]) * err
            den += float(mask[b, i])
    return num / den


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mae_loss_vs_restatement(norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 9, 12, generator=g)
    target = torch.rand(2, 9, 12, generator=g) * 4
    mask = (torch.rand(2, 9, generator=g) < 0.6).float()
    mask[0, 0], mask[0, 1] = 1.0, 0.0
    loss = masked_mae_loss(pred, target, mask, norm_pix=norm_pix)
    assert_close(loss.double(), torch.tensor(ref_mae(pred, target, mask, norm_pix),
                                             dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # visible patches do not count; masked ones do
    changed = pred.clone()
    changed[mask == 0] += 100.0
    assert_close(masked_mae_loss(changed, target, mask, norm_pix=norm_pix), loss)
    changed = pred.clone()
    changed[0, 0] += 100.0
    assert masked_mae_loss(changed, target, mask, norm_pix=norm_pix) > loss + 1.0


def test_masked_mae_loss_nothing_masked_is_zero() -> None:
    loss = masked_mae_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.zeros(1, 4))
    assert loss.item() == 0.0


def test_layer_weights_of_chosen_blocks_and_the_method_uses_them() -> None:
    # blocks 3, 7, 11 of a 12-block ViT: l = 4, 8, 12 -> 1/9, 1/5, 1
    assert_close(layer_weights(12, [3, 7, 11]), torch.tensor([1 / 9, 1 / 5, 1.0]))
    with pytest.raises(ValueError, match="blocks must lie"):
        layer_weights(12, [12])
    from tests.helpers.dex import tiny_dex

    module = tiny_dex()
    depth = len(module.vit.blocks)
    expected = torch.tensor([1.0 / (depth - b) for b in module.dex_layer_blocks])
    assert_close(module.block_weights(), expected)
