"""PretrainModule: EMA teacher, schedules, frozen last layer, switches, logging."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import midol.methods.midol as pretrain_mod
import midol.methods.momentum as momentum_mod
from tests.helpers.tiny import tiny_datamodule, tiny_module


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=3.0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class ParamRecorder(L.Callback):
    """Teacher before, teacher after and student after every optimiser step.

    Callback hooks run before the module's own ``on_train_batch_end`` (where the EMA update
    happens), so the "after" state is read at the start of the next batch / end of training.
    """

    def __init__(self) -> None:
        self.records: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
        self._before: list[torch.Tensor] | None = None

    def _close(self, pl_module) -> None:
        if self._before is not None:
            self.records.append((
                self._before,
                [p.detach().clone() for p in pl_module.teacher.parameters()],
                [p.detach().clone() for p in pl_module.student.parameters()],
            ))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(pl_module)
        self._before = [p.detach().clone() for p in pl_module.teacher.parameters()]

    def on_train_end(self, trainer, pl_module):
        self._close(pl_module)
        self._before = None


def solved_momentum(before, after, student) -> float:
    """m from T_new = m T_old + (1 - m) S_new, solved on the entries where T_old != S_new."""
    num = torch.cat([(a - s).flatten() for a, s in zip(after, student)])
    den = torch.cat([(b - s).flatten() for b, s in zip(before, student)])
    keep = den.abs() > 1e-3
    return float((num[keep] / den[keep]).double().median())


def test_ema_teacher_follows_paper_eq22_with_cosine_momentum():
    torch.manual_seed(0)
    # A large lr moves the student far from the teacher, so a wrong momentum would show.
    module = tiny_module(base_lr=1.0, warmup_epochs=0)
    rec = ParamRecorder()
    steps = 6
    run = trainer(max_steps=steps, callbacks=[rec])
    run.fit(module, tiny_datamodule())
    assert len(rec.records) == steps
    # first update: exactly T <- 0.996 T + 0.004 S
    before, after, student = rec.records[0]
    assert max(float((s - b).abs().max()) for b, s in zip(before, student)) > 1e-2
    for b, a, s in zip(before, after, student):
        torch.testing.assert_close(a, 0.996 * b + 0.004 * s, rtol=1e-5, atol=1e-6)
    # every update uses the cosine schedule value of its step; the last one is close to 1
    for step, (before, after, student) in enumerate(rec.records[1:], start=1):
        expected = 1.0 - 0.004 * (math.cos(math.pi * step / steps) + 1) / 2
        assert solved_momentum(before, after, student) == pytest.approx(expected, abs=2e-4)
    # ... and the momentum the module logged at its last step is that value, 0.99973
    last = 1.0 - 0.004 * (math.cos(math.pi * (steps - 1) / steps) + 1) / 2
    assert float(run.callback_metrics["train/momentum"]) == pytest.approx(last, abs=1e-6)


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    module = tiny_module()
    trainer(max_steps=2).fit(module, tiny_datamodule())
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None for p in module.student.parameters())
    module.train()
    assert not module.teacher.training and module.student.training


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation(monkeypatch):
    calls = []
    real = momentum_mod.ema_update
    monkeypatch.setattr(momentum_mod, "ema_update", lambda t, s, m: (calls.append(m), real(t, s, m)))
    module = tiny_module()
    trainer(max_steps=3, accumulate_grad_batches=2).fit(module, tiny_datamodule())
    assert len(calls) == 3 and calls[0] == pytest.approx(0.996)


class LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.groups: list[list[tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.groups.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])


def test_lr_scaled_by_batch_warmup_cosine_and_weight_decay_schedule():
    module = tiny_module(base_lr=1e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4)
    rec = LrRecorder()
    dm = tiny_datamodule(batch_size=8)  # 101 images -> 12 steps per epoch
    trainer(max_epochs=2, callbacks=[rec]).fit(module, dm)
    total, warmup = 24, 12
    peak = 1e-3 * 8 / 256
    assert len(rec.groups) == total
    for step, groups in enumerate(rec.groups):
        if step < warmup:
            lr = peak * (step + 1) / warmup
        else:
            t = (step - warmup) / (total - warmup)
            lr = 1e-6 + (peak - 1e-6) * (1 + math.cos(math.pi * t)) / 2
        wd = 0.4 - (0.4 - 0.04) * (1 + math.cos(math.pi * step / total)) / 2
        (lr_decay, wd_decay), (lr_plain, wd_plain) = groups
        assert lr_decay == pytest.approx(lr) and lr_plain == pytest.approx(lr)
        assert wd_decay == pytest.approx(wd) and wd_plain == 0.0


def test_norms_and_biases_have_no_weight_decay():
    module = tiny_module()
    optimizer = module.configure_optimizers()
    decay, plain = optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    n_student = sum(1 for p in module.student.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(plain["params"]) == n_student


def test_last_layer_frozen_during_first_epoch_only():
    module = tiny_module(freeze_last_layer_epochs=1, base_lr=1e-2, warmup_epochs=0)
    start = module.last_layer.weight_v.detach().clone()

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.after_first = pl_module.last_layer.weight_v.detach().clone()

    snap = Snapshot()
    trainer(max_epochs=2, limit_train_batches=3, callbacks=[snap]).fit(module, tiny_datamodule())
    assert torch.equal(snap.after_first, start)
    assert not torch.equal(module.last_layer.weight_v, start)


class MetricsRecorder(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("cst_loss", ["infonce", "dino_ce"])
def test_step_logs_losses_lr_momentum_and_expert_usage(cst_loss):
    module = tiny_module(cst_loss=cst_loss)
    rec = MetricsRecorder()
    trainer(max_steps=3, callbacks=[rec]).fit(module, tiny_datamodule())
    last = rec.rows[-1]
    for key in ("train/loss", "train/l_route", "train/l_cst", "train/lr", "train/momentum", "train/teacher_temp"):
        assert math.isfinite(last[key]), key
    usage = [last[f"route/expert_{i}"] for i in range(3)]
    assert sum(usage) == pytest.approx(1.0) and all(u in (0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0) for u in usage)
    assert last["train/loss"] == pytest.approx(last["train/l_route"] + last["train/l_cst"], rel=1e-5)
    assert int(module.images_seen) == 3 * 8


def test_loss_weights_and_route_loss_still_logged_with_weight_zero():
    module = tiny_module(route_weight=0.0, cst_weight=2.0)
    rec = MetricsRecorder()
    trainer(max_steps=1, callbacks=[rec]).fit(module, tiny_datamodule())
    row = rec.rows[-1]
    assert row["train/l_route"] > 0
    assert row["train/loss"] == pytest.approx(2.0 * row["train/l_cst"], rel=1e-5)


def test_dino_baseline_switch_has_no_router_and_trains():
    module = tiny_module(use_moe=False, route_weight=0.0, cst_loss="dino_ce")
    assert module.student["projector"].router is None and module.num_experts == 1
    rec = MetricsRecorder()
    trainer(max_steps=2, callbacks=[rec]).fit(module, tiny_datamodule())
    assert "train/l_route" not in rec.rows[-1] and math.isfinite(rec.rows[-1]["train/l_cst"])
    assert rec.rows[-1]["route/expert_0"] == 1.0


def test_dino_baseline_with_route_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="route_weight"):
        tiny_module(use_moe=False, route_weight=1.0)


@pytest.mark.parametrize(
    "kwargs", [{"num_experts": 0}, {"cst_loss": "mse"}, {"teacher_views": "local"}, {"teacher_temp": 0.0}, {"top_k": 5}]
)
def test_invalid_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        tiny_module(**kwargs)


def test_teacher_on_all_views_runs_teacher_on_every_crop(monkeypatch):
    module = tiny_module(teacher_views="all")
    seen = []
    real = pretrain_mod.encode_views
    monkeypatch.setattr(pretrain_mod, "encode_views", lambda b, v: (seen.append(len(v)), real(b, v))[1])
    trainer(max_steps=1).fit(module, tiny_datamodule(num_local=2))
    assert seen == [4, 4]  # teacher and student both see 2 global + 2 local views


def test_encode_views_calls_backbone_once_per_resolution():
    calls = []

    def backbone(x):
        calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    views = [torch.randn(3, 3, 8, 8)] * 2 + [torch.randn(3, 3, 4, 4)] * 6
    out = pretrain_mod.encode_views(backbone, views)
    assert calls == [(6, 3, 8, 8), (18, 3, 4, 4)]
    assert out.shape == (8, 3, 3)
    torch.testing.assert_close(out[7], views[7].mean(dim=(2, 3)))


def test_assignment_is_teacher_balanced_routing_and_route_images_matches_router():
    module = tiny_module()
    dm = tiny_datamodule()
    dm.setup("fit")
    module.num_global_views = dm.num_global
    batch = next(iter(dm.train_dataloader()))
    out = module.training_step(batch, 0)
    views = [module.normalize(v) for v in batch["views"][:2]]
    with torch.no_grad():
        feats = pretrain_mod.encode_views(module.teacher["backbone"], views)
        logits = module.teacher["projector"].router(feats)
    from midol.losses import teacher_routing_log_probs

    probs = teacher_routing_log_probs(logits, 0.04, 0.05, 3).exp().mean(0)
    assert torch.equal(out["routing"]["route_epoch"].expert, probs.argmax(-1))
    expert, conf = module.route(batch["views"][0], temperature=1.0)[1]["projector"]
    assert torch.equal(expert, logits[0].argmax(-1))
    torch.testing.assert_close(conf, logits[0].softmax(-1).max(-1).values)


def test_load_balance_term_is_added_to_the_loss():
    module = tiny_module(load_balance_weight=0.5, router_noise=0.1)
    rec = MetricsRecorder()
    trainer(max_steps=1, callbacks=[rec]).fit(module, tiny_datamodule())
    row = rec.rows[-1]
    assert 1.0 <= row["train/l_balance"] <= 3.0
    assert row["train/loss"] == pytest.approx(row["train/l_route"] + row["train/l_cst"] + 0.5 * row["train/l_balance"], rel=1e-5)


def test_sinkhorn_impl_reaches_l_route_and_the_authors_floor_bounds_it(monkeypatch):
    """``sinkhorn_impl: authors`` floors a_T at 1e-12, so L_route = -sum a_S log a_T <= 27.63
    for any logits; SwAV's exact a_T has no such bound (and gives another value)."""
    import midol.methods.midol as method_mod

    seen: dict[str, float] = {}
    real = method_mod.routing_cross_entropy

    def record(*args, **kwargs):
        value = real(*args, **kwargs)
        seen[current] = float(value.detach())
        return value

    monkeypatch.setattr(method_mod, "routing_cross_entropy", record)
    dm = tiny_datamodule()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for current in ("swav", "authors"):
        torch.manual_seed(0)
        module = tiny_module(sinkhorn_impl=current, teacher_temp=0.01, warmup_teacher_temp=0.01)
        module.training_step(batch, 0)
    assert seen["authors"] <= -math.log(1e-12) + 1e-3
    assert seen["authors"] != pytest.approx(seen["swav"], rel=1e-3)
    with pytest.raises(ValueError, match="sinkhorn_impl"):
        tiny_module(sinkhorn_impl="other")
