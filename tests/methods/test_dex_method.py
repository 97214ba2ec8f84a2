"""DEX as a midol method: the step's losses, schedules, export of both modes, downstream loading
and exact resume, on a tiny ViT and real sample images."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import timm
import torch

from midol.losses.dex import balance_loss, coherence_loss
from midol.losses.mae import masked_mae_loss, patchify
from midol.methods.export import export_method
from midol.methods.loading import load_method
from midol.tasks.backbones import load_backbone
from tests.helpers.dex import TINY_VIT, dex_datamodule, tiny_dex


def trainer(root, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                    default_root_dir=str(root))
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def real_batch(n: int = 8) -> dict:
    dm = dex_datamodule(batch_size=n)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_training_step_loss_is_mae_plus_weighted_co_and_bal(monkeypatch) -> None:
    torch.manual_seed(0)
    module = tiny_dex(co_weight=0.3, bal_weight=0.2)
    module.train()
    module._total_steps = 10
    seen = {}
    import midol.methods.dex as dex_mod

    real_mae = dex_mod.masked_mae_loss

    def spy(pred, target, mask, norm_pix):
        seen.update(pred=pred, target=target, mask=mask)
        return real_mae(pred, target, mask, norm_pix)

    monkeypatch.setattr(dex_mod, "masked_mae_loss", spy)
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda d, **k: logged.update(d))
    monkeypatch.setattr(module, "log_progress", lambda loss: None)
    batch = real_batch()
    lasts = []
    for layer in module.dex_layers():  # keep each block's routing state before the step clears it
        orig = layer.forward
        layer.forward = (lambda f, lay: (lambda x: (f(x), lasts.append(lay.last))[0]))(orig, layer)
    out = module.training_step(batch, 0)
    assert len(lasts) == 3
    co = [coherence_loss(r.expert_out, r.director_out, "ce", 0.5, 1.0) for r in lasts]
    bal = [balance_loss(r.probs) for r in lasts]
    alpha = [1 / 3, 1 / 2, 1.0]  # 1 / (L - l + 1) for l = 1..3
    l_co = sum(a * c for a, c in zip(alpha, co)) / 3
    l_bal = sum(bal) / 3
    l_mae = masked_mae_loss(seen["pred"], seen["target"], seen["mask"], True)
    torch.testing.assert_close(out["loss"], l_mae + 0.3 * l_co + 0.2 * l_bal)
    torch.testing.assert_close(logged["train/l_co"], l_co)
    cos = torch.nn.functional.cosine_similarity(lasts[2].expert_out, lasts[2].director_out, dim=-1).mean()
    torch.testing.assert_close(logged["dex/alignment_block02"], cos)
    # 75 % of the 16 patches masked per image; the target is the normalised image's patches
    assert seen["mask"].sum(dim=1).tolist() == [12.0] * 8
    torch.testing.assert_close(seen["target"], patchify(module.normalizer(batch["views"][0]), 8))
    assert set(out["routing"]) == {"route_block00", "route_block01", "route_block02"}


def test_plain_mae_baseline_has_no_dex_layers_and_loss_is_mae_only() -> None:
    module = tiny_dex(use_dex=False)
    assert module.dex_layers() == [] and module.routers() == {}
    assert not any("experts" in n for n, _ in module.named_parameters())
    module.train()
    module._total_steps = 10
    module.log_dict = lambda *a, **k: None
    module.log_progress = lambda loss: None
    out = module.training_step(real_batch(), 0)
    assert out["routing"] == {} and math.isfinite(float(out["loss"]))
    assert list(module.export_modules()) == ["backbone"]


def test_schedules_noise_director_momentum_and_balance_weight() -> None:
    module = tiny_dex(bal_schedule="cosine", bal_weight=0.001)
    module._total_steps = 100
    assert module.noise_at(0) == pytest.approx(1.0) and module.noise_at(100) == pytest.approx(0.0)
    assert module.noise_at(50) == pytest.approx(0.5)
    assert module.director_momentum_at(0) == pytest.approx(0.99)
    assert module.director_momentum_at(100) == pytest.approx(0.999)
    assert module.bal_weight_at(0) == pytest.approx(0.001) and module.bal_weight_at(100) == pytest.approx(0.0)
    assert tiny_dex().bal_weight_at(77) == 0.01  # the code's constant


@pytest.mark.parametrize("kwargs,match", [
    ({"co_form": "l2"}, "co_form"), ({"bal_schedule": "step"}, "bal_schedule"),
    ({"top_k": 5}, "top_k"), ({"dex_blocks": [0, 7]}, "dex_blocks"), ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"backbone": "resnet18", "backbone_kwargs": {}}, "VisionTransformer"),
])
def test_invalid_options_are_one_line_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_dex(**kwargs)


def test_fit_then_exports_load_strictly_and_match_both_modes(tmp_path) -> None:
    torch.manual_seed(0)
    module = tiny_dex()
    fitted = trainer(tmp_path, max_steps=4)
    fitted.fit(module, dex_datamodule())
    fitted.save_checkpoint(tmp_path / "m.ckpt")
    directors = [layer.director.fc1.weight.clone() for layer in module.dex_layers()]
    experts0 = module.dex_layers()[0].experts[0].fc1.weight
    assert not torch.equal(directors[0], experts0)  # trained, and the director tracked them
    paths = export_method(module, tmp_path / "export", ["director_backbone", "experts_backbone"])
    meta = json.loads(paths[0].with_suffix(".json").read_text())
    assert "dex" not in meta
    plain = timm.create_model(meta["timm_model"], num_classes=0, **meta["overrides"])
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(str(paths[0])), strict=True)
    plain.eval()
    module.eval()
    images = real_batch(4)["views"][0]
    x = module.normalizer(images)
    module.set_mode("director")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), module.vit(x))
    module.set_mode("experts")
    experts_meta = json.loads(paths[1].with_suffix(".json").read_text())
    assert experts_meta["dex"] == {"blocks": [0, 1, 2], "num_experts": 4, "top_k": 2,
                                   "temperature": 0.5, "token_routing": False}
    for source in (paths[1], None):
        kwargs = ({"checkpoint": paths[1]} if source else
                  {"checkpoint": tmp_path / "m.ckpt", "dex_mode": "experts"})
        routed, info = load_backbone(**kwargs)
        assert info.dex is not None
        routed.eval()
        with torch.no_grad():
            torch.testing.assert_close(routed(x), module.vit(x))
        assert all(layer.noise_std == 0.0 and not layer.update_director
                   for layer in routed.modules() if hasattr(layer, "update_director"))
    with pytest.raises(ValueError, match="dense backbone"):
        load_backbone(checkpoint=paths[0], dex_mode="experts")
    with pytest.raises(ValueError, match="needs a DEX"):
        load_backbone(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, dex_mode="director")


def test_route_gives_every_block_top1_without_noise(tmp_path) -> None:
    module = tiny_dex()
    images = real_batch(6)["views"][0]
    feats, routes = module.route(images)
    assert feats.shape == (6, 32) and set(routes) == {"block00", "block01", "block02"}
    again = module.route(images)[1]
    for name, r in routes.items():
        assert torch.equal(r.expert, again[name].expert)  # no noise at inference
        assert ((r.confidence > 0) & (r.confidence <= 1)).all()


def test_resume_continues_exactly(tmp_path) -> None:
    """Director, frequency buffers and the noise schedule continue: 3 + 3 steps == 6 steps."""
    def run(ckpt=None, save=None):
        L.seed_everything(0)
        module = tiny_dex()
        callbacks = []
        if save:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=save, every_n_train_steps=3,
                                                                 save_top_k=-1))
        t = trainer(tmp_path, max_steps=6, enable_checkpointing=bool(save), callbacks=callbacks)
        t.fit(module, dex_datamodule(), ckpt_path=ckpt)
        return module

    full = run(save=tmp_path / "ck")  # mid-epoch checkpoint at step 3 (12 batches per epoch)
    resumed = run(ckpt=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name, atol=1e-6, rtol=1e-5)
    layer = resumed.dex_layers()[1]
    assert not torch.allclose(layer.freq, torch.full_like(layer.freq, 0.25))
    assert layer.noise_std == pytest.approx(resumed.noise_at(5))


def test_loads_back_through_load_method(tmp_path) -> None:
    module = tiny_dex()
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)])
    t.fit(module, dex_datamodule())
    loaded = load_method(tmp_path / "c" / "last.ckpt")
    assert type(loaded).__name__ == "DEX"
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_activation_checkpointing_changes_nothing(tmp_path) -> None:
    """Checkpointing re-runs each block's forward in backward: the director and frequency
    updates (applied after backward) and every weight must equal a run without it."""
    states = []
    for ckpt in (False, True):
        L.seed_everything(0)
        module = tiny_dex(grad_checkpointing=ckpt)
        trainer(tmp_path, max_steps=3).fit(module, dex_datamodule())
        states.append(module.state_dict())
    for name, a in states[0].items():
        torch.testing.assert_close(a, states[1][name], msg=name, atol=1e-6, rtol=1e-5)
    freq = states[0]["vit.blocks.0.mlp.freq"]
    assert not torch.allclose(freq, torch.full_like(freq, 0.25))  # the statistics did move


def test_director_follows_group_ema_of_pre_update_experts(tmp_path) -> None:
    """One step: theta_D(after) = m theta_D(before) + (1 - m) sum_r Omega_r theta_E_r(before)."""
    L.seed_everything(0)
    module = tiny_dex()
    layer = module.dex_layers()[2]
    before = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before["d"] = layer.director.fc2.weight.detach().clone()
            before["e"] = [e.fc2.weight.detach().clone() for e in layer.experts]

        def on_after_backward(self, trainer, pl_module):  # runs before the module's hook
            before["omega"] = layer._pending_omega.clone()
            before["m"] = layer.director_momentum

    trainer(tmp_path, max_steps=1, callbacks=[Grab()]).fit(module, dex_datamodule())
    m, omega = before["m"], before["omega"]
    expected = m * before["d"] + (1 - m) * sum(w * e for w, e in zip(omega.tolist(), before["e"]))
    torch.testing.assert_close(layer.director.fc2.weight, expected)
    assert float(omega.sum()) == pytest.approx(1.0)
