"""RoutingMonitor: epoch matrix and NMI from the training assignments, teacher statistics from
the teacher's own forward, collapse warnings with typed thresholds."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from midol.callbacks import RoutingMonitor
from midol.methods.interfaces import ExpertChoice
from midol.utils.cluster_metrics import distribution_stats, normalized_mutual_info, purity
from tests.helpers.tiny import tiny_datamodule, tiny_module


class Recorder(L.Callback):
    """The assignment and modality of every training batch, as the module returned them."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, outputs["routing"]["route_epoch"].expert.clone(), batch["modality"].clone()))


def fit(module, monitor, epochs: int = 2, batches: int = 3, **trainer_kwargs):
    recorder = Recorder()
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, log_every_n_steps=1)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[monitor, recorder], **kwargs)
    trainer.fit(module, tiny_datamodule())
    return trainer, recorder


def test_epoch_matrix_nmi_and_images_match_the_training_assignments(tmp_path):
    L.seed_everything(0)
    monitor = RoutingMonitor(teacher_every_n_steps=1, image_dir=str(tmp_path))
    module = tiny_module()
    logits: list[torch.Tensor] = []  # teacher router logits of every training step
    module.teacher["projector"].register_forward_hook(lambda m, i, o: logits.append(o.router_logits.clone()))
    trainer, recorder = fit(module, monitor, epochs=2, batches=2)
    assert len(logits) == len(recorder.batches) == 4
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    for h in monitor.history:
        counts = np.zeros((3, 2), dtype=np.int64)  # 3 experts x (xray, pathology)
        for epoch, assignment, modality in recorder.batches:
            if epoch == h["epoch"]:
                np.add.at(counts, (assignment.numpy(), modality.numpy()), 1)
        assert h["counts"] == counts.tolist() and counts.sum() == 2 * 8
        assert h["nmi"] == pytest.approx(normalized_mutual_info(counts))
        assert h["purity"] == pytest.approx(purity(counts))
        assert h["modalities"] == ["xray", "pathology"]
    # router top-1: arg-max of the teacher router logits averaged over the 2 teacher views
    for h in monitor.top1_history:
        counts = np.zeros((3, 2), dtype=np.int64)
        for (epoch, _, modality), lg in zip(recorder.batches, logits):
            if epoch == h["epoch"]:
                top1 = lg.view(2, 8, 3).mean(dim=0).argmax(dim=-1)
                np.add.at(counts, (top1.numpy(), modality.numpy()), 1)
        assert h["counts"] == counts.tolist()
    assert len(monitor.top1_history) == 2
    last = monitor.history[-1]
    metrics = trainer.callback_metrics
    assert float(metrics["route_epoch/nmi"]) == pytest.approx(last["nmi"], abs=1e-6)
    assert float(metrics["route_epoch/load_0"]) == pytest.approx(last["expert_load"][0], abs=1e-6)
    for key in ("teacher/mean_cosine", "route/router_entropy", "route/router_info"):
        assert key in metrics
    assert 0 <= float(metrics["route/router_entropy"]) <= 1 and -1 <= float(metrics["teacher/mean_cosine"]) <= 1
    assert "teacher/info" not in metrics  # infonce: no output distribution
    assert float(metrics["route_top1/nmi"]) == pytest.approx(monitor.top1_history[-1]["nmi"], abs=1e-6)
    for epoch in (0, 1):
        for name in ("routing", "routing_top1"):
            image = Image.open(tmp_path / f"{name}_epoch{epoch:03d}.png")
            assert image.size == (420, 345)  # max(4, 1.1 * 2 + 2) x max(3, 0.55 * 3 + 1.8) inches
            assert np.asarray(image.convert("L")).std() > 10
    assert [w for w in monitor.warnings if "collapse" in w] == []  # a healthy short run
    assert module.health_every_n_steps == 1  # the monitor set the module's statistics cadence


def test_teacher_statistics_are_those_of_the_training_forward():
    """dino_ce: teacher/info etc. equal distribution_stats of softmax((t - center) / tau_t) of
    the teacher outputs the training step computed (captured here by a second hook)."""
    L.seed_everything(0)
    module = tiny_module(cst_loss="dino_ce", teacher_temp=0.07, warmup_teacher_temp=0.07)
    monitor = RoutingMonitor(teacher_every_n_steps=1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.teacher["projector"].register_forward_hook(
        lambda m, i, o: seen.append((o.representation.detach().clone(), module.dino_loss.center.clone()))
    )

    class Logged(L.Callback):
        values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            Logged.values.append(float(monitor.last_stats["teacher/info"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[monitor, Logged()])
    trainer.fit(module, tiny_datamodule())
    assert len(seen) == 2 and len(Logged.values) == 2
    for (rep, center), logged in zip(seen, Logged.values):
        expected = distribution_stats(((rep - center) / 0.07).softmax(dim=-1))["info"]
        assert logged == pytest.approx(float(expected), rel=1e-5)


def test_collapse_warnings_fire_after_the_patience():
    """Thresholds that the healthy run crosses on every step (an expert always holds more than
    30 % of a batch with 3 experts; cosine similarities are above -1) make both warnings fire,
    once per episode."""
    L.seed_everything(0)
    monitor = RoutingMonitor(collapse_share=0.3, collapse_patience=3, teacher_every_n_steps=2,
                             max_teacher_cosine=-1.0, teacher_patience=2)
    with pytest.warns(UserWarning, match="RoutingMonitor: expert collapse") as record:
        fit(tiny_module(), monitor, epochs=1, batches=4)
    # checks run at steps 0 and 2 (1 and 2 new batches): the streak reaches 3 at the second
    assert "for 3 consecutive batches" in next(w for w in monitor.warnings if "expert collapse" in w)
    assert sum("expert collapse" in w for w in monitor.warnings) == 1
    assert sum("teacher collapse" in w for w in monitor.warnings) == 1
    assert any("teacher collapse" in str(w.message) for w in record)


def test_idle_experts_warning_when_the_router_top1_abandons_experts():
    """A router biased towards expert 0 sends every image's top-1 there, while Sinkhorn still
    spreads the training assignment over all experts: only the top-1 matrix shows it."""
    L.seed_everything(0)
    module = tiny_module()
    with torch.no_grad():
        for part in (module.student, module.teacher):
            part["projector"].router.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    monitor = RoutingMonitor(log_images=False)
    with pytest.warns(UserWarning, match=r"idle experts: in epoch 0 .* experts \[1, 2\]"):
        fit(module, monitor, epochs=2, batches=1)
    (idle,) = [w for w in monitor.warnings if "idle experts" in w]  # not repeated in epoch 1
    assert "only 1 of 3 in use" in idle
    assert monitor.top1_history[0]["expert_load"] == [1.0, 0.0, 0.0]
    assert monitor.history[0]["experts_used"] == 3  # the balanced training assignment


def test_check_counts_streaks_on_the_host():
    monitor = RoutingMonitor(collapse_share=0.9, collapse_patience=3, teacher_patience=2,
                             min_teacher_info=0.05)
    monitor._pl_module = SimpleNamespace(dino_loss=object())
    trainer = SimpleNamespace(global_step=10)
    shares = [0.95, 0.95, 0.95, 0.95, 0.5, 0.92, 0.99, 0.93, 0.2]
    monitor._choices = {"route_epoch": ExpertChoice(torch.zeros(4, dtype=torch.long), 5)}
    monitor._shares = {"route_epoch": [torch.tensor([s, 2.0]) for s in shares]}
    monitor._teacher_key = "teacher/info"
    monitor._teacher_values = [torch.tensor(v) for v in (0.01, 0.3, 0.01, 0.02, 0.01)]
    with pytest.warns(UserWarning):
        monitor._check(trainer)
    expert = [w for w in monitor.warnings if "expert collapse" in w]
    teacher = [w for w in monitor.warnings if "teacher collapse" in w]
    assert len(expert) == 2 and "expert 2" in expert[0]  # two runs of >= 3 batches above 0.9
    assert len(teacher) == 1 and "teacher/info = 0.0200" in teacher[0]
    assert monitor._streaks["route_epoch"] == 0 and monitor._teacher_streak == 3
    # one expert (the no-MoE baseline) never counts as collapse
    monitor = RoutingMonitor(collapse_patience=1)
    monitor._pl_module = SimpleNamespace()
    monitor._choices = {"route_epoch": ExpertChoice(torch.zeros(4, dtype=torch.long), 1)}
    monitor._shares = {"route_epoch": [torch.tensor([1.0, 0.0])] * 3}
    monitor._check(trainer)
    assert monitor.warnings == []


def test_heldout_pass_and_no_moe_baseline():
    L.seed_everything(0)
    monitor = RoutingMonitor(heldout_every_n_epochs=1, heldout_per_modality=10, log_images=False)
    trainer, _ = fit(tiny_module(), monitor, epochs=1, batches=2)
    (held,) = monitor.heldout_history
    assert held["images"] == 20 and np.asarray(held["counts"]).sum(axis=0).tolist() == [10, 10]
    assert float(trainer.callback_metrics["route_heldout/nmi"]) == pytest.approx(held["nmi"], abs=1e-6)
    # the DINO baseline: one expert, load 1, no router statistics, no collapse warning
    monitor = RoutingMonitor(collapse_patience=1, teacher_every_n_steps=1, log_images=False)
    trainer, _ = fit(tiny_module(use_moe=False, route_weight=0.0, cst_loss="dino_ce"), monitor, epochs=1, batches=2)
    assert monitor.history[0]["expert_load"] == [1.0] and monitor.warnings == []
    assert "route/router_entropy" not in trainer.callback_metrics
    assert 0 <= float(trainer.callback_metrics["teacher/info"]) <= 1


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="collapse_share"):
        RoutingMonitor(collapse_share=1.5)
    with pytest.raises(ValueError, match="collapse_patience"):
        RoutingMonitor(collapse_patience=0)
    with pytest.raises(ValueError, match="teacher_every_n_steps"):
        RoutingMonitor(teacher_every_n_steps=0)
    monitor = RoutingMonitor()
    with pytest.raises(ValueError, match="routers"):
        monitor.on_fit_start(SimpleNamespace(), L.LightningModule())


def test_a_loss_term_flat_for_the_whole_run_is_warned_about():
    """Issue 26: DEX's L_co stayed within 0.1% for a whole run and nothing said so."""
    import warnings

    monitor = RoutingMonitor()
    monitor._reset_state()
    module = SimpleNamespace(summary_metrics=lambda: ["train/l_co", "train/l_mae"],
                             flat_term_hint=lambda key: "a hint" if key == "train/l_co" else "")
    values = {"train/l_co": [1.6975, 1.6970, 1.6981, 1.6968], "train/l_mae": [0.9, 0.7, 0.6, 0.55]}
    for epoch in range(4):
        trainer = SimpleNamespace(current_epoch=epoch, global_step=epoch, heldout=None,
                                  callback_metrics={k: torch.tensor(v[epoch]) for k, v in values.items()})
        monitor.heldout_every_n_epochs = 0
        monitor.on_train_epoch_end(trainer, module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_train_end(trainer, module)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("train/l_co stayed within 0.0013 of 1.697")
    assert "over 4 epochs" in messages[0] and messages[0].endswith("; a hint")


def test_dex_coherence_starts_at_its_floor_so_a_flat_l_co_is_not_a_missing_gradient():
    """The finding behind the flat L_co (issue 26). The CE form cannot fall below the entropy of
    its target softmax(f_D / 0.5); with block outputs this small (std ~0.01) that target is almost
    uniform, so the floor is log D. The experts start as copies of the director (cosine form 0), so
    L_co starts at that floor and stays there while the experts stay coherent with the director:
    a flat L_co is the term being satisfied, not a gradient that fails to reach the experts."""
    import math

    import torch.nn.functional as F

    from midol.losses.dex import coherence_loss
    from tests.helpers.dex import tiny_dex

    torch.manual_seed(0)
    module = tiny_dex()
    module.train()
    module.vit.forward_features(module.normalizer(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)))
    last = next(iter(module.dex_layers())).last
    d = last.director_out.shape[-1]
    target = F.softmax(last.director_out.float() / 0.5, -1)
    entropy = float(-(target * target.log()).sum(-1).mean())
    assert entropy == pytest.approx(math.log(d), rel=1e-3)  # a near-uniform target
    ce = float(coherence_loss(last.expert_out, last.director_out, "ce"))
    assert ce == pytest.approx(entropy, rel=1e-4)  # at its floor H(target)
    assert float(coherence_loss(last.expert_out, last.director_out, "cosine")) < 1e-6  # copies
    assert "floor" in module.flat_term_hint("train/l_co")
