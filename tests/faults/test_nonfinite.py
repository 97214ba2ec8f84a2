"""A NaN/inf loss never passes silently: it stops the run naming the term and the step, or (when
configured) skips exactly that optimiser step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import midol.methods.midol as pretrain_mod
from tests.helpers.tiny import tiny_datamodule, tiny_module


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=5,
    )
    return L.Trainer(**(defaults | kwargs))


def _nan_from_call(monkeypatch: pytest.MonkeyPatch, target: str, calls: set[int]) -> None:
    """Make ``pretrain_mod.<target>`` (a loss function) return NaN on the given call numbers."""
    original = getattr(pretrain_mod, target)
    count = {"n": 0}

    def faulty(*args, **kwargs):
        value = original(*args, **kwargs)
        count["n"] += 1
        return value * float("nan") if count["n"] in calls else value

    monkeypatch.setattr(pretrain_mod, target, faulty)


def test_nonfinite_loss_raises_naming_the_term_and_the_step(monkeypatch) -> None:
    _nan_from_call(monkeypatch, "expert_infonce_loss", {4})  # the 4th step: global step 3
    with pytest.raises(FloatingPointError) as err:
        _trainer().fit(tiny_module(), datamodule=tiny_datamodule())
    message = str(err.value)
    assert "non-finite loss l_cst, total at global step 3 (epoch 0, batch 3)" in message
    assert "l_route=" in message and "l_cst=nan" in message and "nonfinite: skip" in message


class _Poison(L.Callback):
    """Write NaN into one student weight before batch ``at`` (a corrupted update)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.student["backbone"].patch_embed.proj.weight[0, 0, 0, 0] = float("nan")


def test_nonfinite_weights_name_every_term_and_skips_are_bounded() -> None:
    with pytest.raises(FloatingPointError, match=r"l_route, l_cst, total at global step 2"):
        _trainer(callbacks=[_Poison(2)]).fit(tiny_module(), datamodule=tiny_datamodule())
    # With skip, a model that stays broken still stops: after max_nonfinite_skips in a row.
    module = tiny_module(nonfinite="skip", max_nonfinite_skips=2)
    with pytest.warns(UserWarning, match="skipping this optimiser step") as caught:
        with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
            _trainer(callbacks=[_Poison(1)]).fit(module, datamodule=tiny_datamodule())
    assert sum("skipping this optimiser step" in str(w.message) for w in caught) == 2


class _Snapshots(L.Callback):
    """Student, teacher, DINO centre and AdamW moments at the start of every batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = {f"student.{k}": v.clone() for k, v in pl_module.student.state_dict().items()}
        state |= {f"teacher.{k}": v.clone() for k, v in pl_module.teacher.state_dict().items()}
        state["center"] = pl_module.dino_loss.center.clone()
        for i, s in enumerate(trainer.optimizers[0].state.values()):
            state[f"exp_avg.{i}"] = s["exp_avg"].clone()
        self.states.append(state)
        self.steps.append(trainer.global_step)


def test_nonfinite_skip_leaves_the_step_without_any_update(monkeypatch) -> None:
    forward = pretrain_mod.DINOLoss.forward
    calls = {"n": 0}

    def faulty(self, *args, **kwargs):
        value = forward(self, *args, **kwargs)  # also computes a centre update, to be discarded
        calls["n"] += 1
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(pretrain_mod.DINOLoss, "forward", faulty)
    snaps = _Snapshots()
    module = tiny_module(cst_loss="dino_ce", nonfinite="skip", freeze_last_layer_epochs=0)
    with pytest.warns(UserWarning, match=r"non-finite loss l_cst, total at global step 2"):
        _trainer(callbacks=[snaps]).fit(module, datamodule=tiny_datamodule())
    assert snaps.steps == [0, 1, 2, 3, 4]  # the skipped step still counts for the schedules
    before, after = snaps.states[2], snaps.states[3]  # around the skipped step (global step 2)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == list(before)
    # ... while a normal step changes the student, the teacher, the centre and the moments.
    nxt = snaps.states[4]
    moved = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, nxt[k])}
    assert {"student", "teacher", "center", "exp_avg"} <= moved


def test_nonfinite_options_are_validated() -> None:
    with pytest.raises(ValueError, match="nonfinite must be"):
        tiny_module(nonfinite="ignore")
    with pytest.raises(ValueError, match="max_nonfinite_skips"):
        tiny_module(max_nonfinite_skips=-1)


def test_one_step_late_check_raises_at_the_next_step_naming_the_bad_one(monkeypatch) -> None:
    _nan_from_call(monkeypatch, "expert_infonce_loss", {3})  # global step 2
    seen: list[int] = []

    class _Steps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(trainer.global_step)

    with pytest.raises(FloatingPointError) as err:
        _trainer(callbacks=[_Steps()]).fit(tiny_module(nonfinite_check="one_step_late"),
                                           datamodule=tiny_datamodule())
    message = str(err.value)
    assert "non-finite loss l_cst, total at global step 2 (epoch 0, batch 2)" in message
    assert "read one step late" in message
    assert seen == [0, 1, 2, 3]  # detected in step 3's check, before its backward


def test_one_step_late_check_stops_before_a_checkpoint_holds_the_bad_update(
    monkeypatch, tmp_path
) -> None:
    _nan_from_call(monkeypatch, "expert_infonce_loss", {2})  # global step 1
    ckpt = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(enable_checkpointing=True, callbacks=[ckpt], max_steps=4)
    module = tiny_module(nonfinite_check="one_step_late")
    # The checkpoint after step 1 would hold step 1's update: it is refused, and nothing from
    # step 1 on is written.
    with pytest.raises(FloatingPointError, match="at global step 1 .*read one step late"):
        trainer.fit(module, datamodule=tiny_datamodule())
    assert list(tmp_path.glob("*.ckpt")) == []


def test_one_step_late_check_trains_exactly_as_the_every_step_check() -> None:
    states = []
    for check in ("every_step", "one_step_late"):
        L.seed_everything(0)
        module = tiny_module(nonfinite_check=check)
        _trainer(max_steps=3).fit(module, datamodule=tiny_datamodule())
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], tiny_module().state_dict()[k]) for k in states[0])


def test_one_step_late_needs_raise() -> None:
    with pytest.raises(ValueError, match="one_step_late needs nonfinite: raise"):
        tiny_module(nonfinite="skip", nonfinite_check="one_step_late")
    with pytest.raises(ValueError, match="nonfinite_check must be"):
        tiny_module(nonfinite_check="sometimes")
