"""Exact resume: SIGKILL / SIGTERM a real `midol fit` mid-epoch, resume, compare with a run that
was never interrupted (losses, lr, momentum, teacher temperature, DINO centre, every weight)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader

from midol.data.sampler import Draw, ResumableDataLoader
from tests.helpers.faults import finish, start_fit, step_metrics, tiny_config, wait_for
from tests.helpers.tiny import tiny_datamodule

STEPS = 12  # 3 epochs x 4 batches in tiny_config


def _indices(batches: list[dict]) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_loader_skips_trained_batches_and_keeps_views(num_workers: int) -> None:
    """A loader restored to (epoch 1, 2 batches done) yields exactly batches 2.. of epoch 1,
    with the same augmented pixels, whichever worker loads them."""
    dm = tiny_datamodule(samples_per_epoch=40, num_workers=num_workers, persistent_workers=True)
    full = dm.train_dataloader()
    assert isinstance(full, ResumableDataLoader) and len(full) == 5
    full.batch_sampler.sampler.set_epoch(1)
    epoch1 = list(full)
    resumed = tiny_datamodule(samples_per_epoch=40, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(
        {"epoch": 1, "batches_done": 2, "num_batches": 5, "batch_size": 8, "world_size": 1}
    )
    rest = list(resumed)
    assert _indices(rest) == _indices(epoch1)[2:]
    for a, b in zip(rest, epoch1[2:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))
    # The skip is one-shot: the next epoch is whole again (and differs from epoch 1).
    resumed.batch_sampler.sampler.set_epoch(2)
    epoch2 = list(resumed)
    assert len(epoch2) == 5 and _indices(epoch2) != _indices(epoch1)


def test_resume_loader_state_roundtrip_and_epoch_end() -> None:
    dm = tiny_datamodule(samples_per_epoch=40)
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(3)
    assert loader.state_dict() == {
        "epoch": 3, "batches_done": 0, "num_batches": 5, "batch_size": 8, "world_size": 1
    }
    # Saved after the last batch of epoch 3: the resumed run starts epoch 4 from its start.
    loader.load_state_dict({**loader.state_dict(), "batches_done": 5})
    assert loader.batch_sampler.sampler.epoch == 4 and loader._draws.skip == 0
    with pytest.warns(UserWarning, match="continues approximately"):
        loader.load_state_dict(
            {"epoch": 1, "batches_done": 2, "num_batches": 10, "batch_size": 4, "world_size": 1}
        )
    assert loader._draws.skip == 1  # 2 batches of 4 images = 1 batch of 8


def test_resume_loader_survives_lightning_ddp_reinstantiation() -> None:
    """Under DDP Lightning rebuilds the loader around a DistributedSamplerWrapper: the class,
    the progress hook and the per-rank share of the epoch order must survive."""
    dm = tiny_datamodule(samples_per_epoch=40, batch_size=4)
    loader = dm.train_dataloader()
    order = list(loader.batch_sampler.sampler)
    sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=1, shuffle=False)
    rebuilt = _update_dataloader(loader, sampler)
    assert isinstance(rebuilt, ResumableDataLoader)
    assert rebuilt.batches_done == loader.batches_done and len(rebuilt) == 5
    draws = [d for batch in rebuilt._draws for d in batch]
    assert [d.index for d in draws] == order[1::2]  # rank 1 of 2
    assert [d.position for d in draws] == list(range(1, 40, 2))  # its places in the full order
    rebuilt.load_state_dict(rebuilt.state_dict() | {"batches_done": 3})
    assert [d.index for batch in rebuilt._draws for d in batch] == order[1::2][12:]


def test_resume_draw_keys_reach_the_dataset() -> None:
    dm = tiny_datamodule()
    dm.setup("fit")
    assert dm.dataset is not None
    a = dm.dataset[Draw(index=5, epoch=0, position=7)]
    b = dm.dataset[Draw(index=5, epoch=0, position=7)]
    c = dm.dataset[Draw(index=5, epoch=1, position=7)]
    assert a["index"] == 5 and all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    assert not torch.equal(a["views"][0], c["views"][0])


# ---------------------------------------------------------------- real processes
class _Runs:
    """Three `midol fit` processes started together (the machine has 2 cores and each run is
    single-threaded): the uninterrupted reference (2 data workers), one paused at step 7 (to be
    SIGKILLed) and one paused at step 10 (to receive SIGTERM), both loading in the main process:
    the data order and the augmentations do not depend on the workers."""

    def __init__(self, root: Path) -> None:
        self.ref = root / "uninterrupted"
        self.killed, self.terminated = root / "killed", root / "terminated"
        self.procs = {
            "ref": start_fit(tiny_config(self.ref), "--weights_only", "true",
                             log=root / "ref.log"),
            "killed": start_fit(
                tiny_config(self.killed, num_workers=0, pause=(7, root / "paused7")),
                log=root / "killed.log"),
            "terminated": start_fit(
                tiny_config(self.terminated, num_workers=0, pause=(10, root / "paused10")),
                log=root / "terminated.log"),
        }
        self.root = root
        self._ref_rc: int | None = None

    def reference(self) -> Path:
        if self._ref_rc is None:
            self._ref_rc = finish(self.procs["ref"], self.root / "ref.log")
        assert self._ref_rc == 0, (self.root / "ref.log").read_text()[-3000:]
        return self.ref

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    started = _Runs(tmp_path_factory.mktemp("runs"))
    yield started
    started.close()


def _last(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _resume_and_compare(run: Path, runs: _Runs, first_step: int) -> None:
    proc = start_fit(tiny_config(run, num_workers=0), "--ckpt_path", "last",
                     "--weights_only", "true", log=run / "resume.log")
    assert finish(proc, run / "resume.log") == 0, (run / "resume.log").read_text()[-3000:]
    ref = runs.reference()
    expected, resumed = step_metrics(ref, 0), step_metrics(run, 1)
    assert sorted(resumed) == list(range(first_step, STEPS))
    for step, metrics in resumed.items():
        for name in ("train/loss", "train/l_cst", "train/l_route", "train/lr", "train/momentum",
                     "train/teacher_temp", "train/weight_decay", "epoch"):
            if name in expected[step] or name in metrics:
                assert metrics[name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (
                    f"{name} at step {step}"
                )
    a, b = _last(ref), _last(run)
    assert a["global_step"] == b["global_step"] == STEPS
    centre = a["state_dict"]["dino_loss.center"]
    assert centre.abs().sum() > 0 and torch.equal(centre, b["state_dict"]["dino_loss.center"])
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), rtol=0, atol=1e-6), key


def test_resume_after_sigkill_mid_epoch_matches_uninterrupted_run(runs: _Runs) -> None:
    """Kill -9 after step 7 (epoch 1, batch 3); the last checkpoint is the step-6 one (epoch 1,
    2 batches in, written before the EMA update of step 6); resume must redo steps 6..11."""
    proc, log = runs.procs["killed"], runs.root / "killed.log"
    wait_for(runs.root / "paused7", proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = _last(runs.killed)
    assert saved["global_step"] == 6
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches_done": 2, "num_batches": 4, "batch_size": 8, "world_size": 1}
    ]
    # The EMA runs right after each optimizer step, so a step checkpoint holds it (midol <= 0.1.0
    # wrote the checkpoint first and caught the EMA up on resume, under this key).
    assert "midol_last_ema_step" not in saved
    _resume_and_compare(runs.killed, runs, first_step=6)


def test_sigterm_writes_checkpoint_then_resume_matches_uninterrupted_run(runs: _Runs) -> None:
    proc, log = runs.procs["terminated"], runs.root / "terminated.log"
    wait_for(runs.root / "paused10", proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "SIGTERM received: checkpoint written to" in text and "global step 10" in text
    saved = _last(runs.terminated)  # by PreemptionCheckpoint after step 10 (epoch 2, batch 2)
    assert saved["global_step"] == 10 and "midol_last_ema_step" not in saved
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == 2
    # A cut-short run exports nothing (the reference, which finished, did).
    assert not (runs.terminated / "teacher_backbone.safetensors").exists()
    assert (runs.reference() / "teacher_backbone.safetensors").exists()
    _resume_and_compare(runs.terminated, runs, first_step=10)


@pytest.mark.slow
def test_sigterm_resume_under_ddp_matches_uninterrupted_ddp_run(tmp_path: Path) -> None:
    """Two CPU ranks (gloo): SIGTERM to the launching process reaches both ranks, they stop at
    the same batch, the checkpoint records the per-rank layout, and the resumed run ends with
    the weights of an uninterrupted two-rank run. ~2 min on 2 cores."""
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "4"]
    ref, run, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "paused"
    proc = start_fit(tiny_config(ref), *ddp, log=tmp_path / "ref.log")
    assert finish(proc, tmp_path / "ref.log", timeout=900) == 0
    proc = start_fit(tiny_config(run, pause=(10, marker)), *ddp, log=tmp_path / "term.log")
    wait_for(marker, proc, tmp_path / "term.log", timeout=900)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    saved = _last(run)
    assert saved["global_step"] == 10
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 2, "batches_done": 2, "num_batches": 4, "batch_size": 4, "world_size": 2}
    ]
    proc = start_fit(tiny_config(run), "--ckpt_path", "last", *ddp, log=tmp_path / "resume.log")
    assert finish(proc, tmp_path / "resume.log", timeout=900) == 0
    expected, resumed = step_metrics(ref, 0), step_metrics(run, 1)
    assert sorted(resumed) == list(range(10, STEPS))
    for step, metrics in resumed.items():
        assert metrics["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-6)
    a, b = _last(ref)["state_dict"], _last(run)["state_dict"]
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), rtol=0, atol=1e-6), key
