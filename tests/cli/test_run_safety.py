"""Run folders, overwrites and checkpoint safety of `midol fit` (issue 14, items 1, 2, 3, 5, 7, 9).

A killed checkpoint write keeps the previous checkpoint; a damaged ``--ckpt_path`` falls back to
the newest readable checkpoint; a rerun does not overwrite a previous run; a resume keeps the
command line's settings and names those that differ from the checkpoint's; a checkpoint does
not choose what code is imported; unwritable output folders fail before training; every preset
leaves a resumable ``last.ckpt`` at each epoch end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from midol.cli import main, run_lightning, with_atomic_checkpoint_io
from midol.config_compose import load_composed
from midol.errors import CheckpointFileError, UsageError
from midol.io.checkpoint_io import AtomicCheckpointIO, last_checkpoint
from midol.run_guard import OutputFolderError
from tests.helpers.faults import flip_a_bit, midol_env, tiny_config

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 2  # 16 samples per epoch, batches of 8


class CrashAtEpochStart(L.Callback):
    """Test fixture: a crash (any error, as an OOM or a node failure would be) at the start of
    epoch ``epoch``, after the previous epochs finished."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


def ablation_args(root: Path, *extra: str) -> list[str]:
    """``configs/ablations/base.yaml`` as shipped (its callbacks included), shrunk to a tiny
    model and 2 steps per epoch, with every output under ``root`` (--trainer.default_root_dir)."""
    sources = [{"path": str(REPO / "sample_data/xray"), "modality": "xray"},
               {"path": str(REPO / "sample_data/pathology"), "modality": "pathology"}]
    swin = {"img_size": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
    return [
        "fit", "--config", str(REPO / "configs/ablations/base.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.backbone_kwargs", json.dumps(swin),
        "--model.init_args.num_experts", "3", "--model.init_args.expert_hidden_dim", "32",
        "--model.init_args.bottleneck_dim", "16", "--model.init_args.out_dim", "64",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--data.init_args.samples_per_epoch", str(8 * STEPS_PER_EPOCH),
        "--data.init_args.transform.init_args.global_size", "32",
        "--data.init_args.transform.init_args.local_size", "16",
        "--data.init_args.transform.init_args.num_local", "2",
        "--data.init_args.sources", json.dumps(sources),
        *extra,
    ]


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real tiny run of the ablation preset that crashes at the start of its second epoch;
    its checkpoint folder and a copy of the ``last.ckpt`` it left."""
    root = tmp_path_factory.mktemp("ablation")
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        with pytest.raises(RuntimeError, match="simulated crash at the start of epoch 1"):
            main(ablation_args(root, f"--trainer.callbacks+={__name__}.CrashAtEpochStart"))
    finally:
        os.chdir(cwd)
    last = root / "checkpoints" / "last.ckpt"
    copy = tmp_path_factory.mktemp("saved") / "epoch0.ckpt"
    if last.is_file():
        shutil.copy2(last, copy)
    return {"root": root, "last": last, "copy": copy}


@pytest.fixture
def record_fit(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``Trainer.fit`` replaced by a recorder: what the CLI would train, without training."""
    calls: list[dict[str, Any]] = []

    @functools.wraps(L.Trainer.fit)  # the signature LightningCLI builds `fit`'s options from
    def fit(trainer, model, *args: Any, **kwargs: Any) -> None:
        calls.append({"model": model, **kwargs})

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return calls


def _resume_folder(tmp_path: Path, crashed_run: dict[str, Any]) -> Path:
    """A run folder holding a copy of the crashed run's epoch-0 checkpoint as last.ckpt."""
    assert crashed_run["copy"].is_file(), "the crashed run left no last.ckpt (see the item 9 test)"
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy2(crashed_run["copy"], ckpt_dir / "last.ckpt")
    return tmp_path / "run"


# ------------------------------------------------------------------ item 1: atomic writes
CHILD = textwrap.dedent('''
    """Slow disk plus a $TMPDIR on "another filesystem": renames out of $TMPDIR fail with EXDEV
    (as across devices), and once armed, every way bytes reach a file (sendfile and copyfileobj
    of shutil's copy, torch.save to a path) writes half of them, then sleeps."""
    import errno, hashlib, io, os, shutil, sys, time
    from pathlib import Path
    import torch

    out, scratch, saved, writing, config = map(Path, sys.argv[1:6])
    armed = False

    def pause():
        writing.write_text("half written")
        time.sleep(120)

    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        if str(Path(src).absolute()).startswith(str(scratch)) and \\
                not str(Path(dst).absolute()).startswith(str(scratch)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_rename(src, dst, *args, **kwargs)
    os.rename = rename

    real_sendfile = os.sendfile
    def sendfile(out_fd, in_fd, offset, count):
        if armed:
            real_sendfile(out_fd, in_fd, offset, os.fstat(in_fd).st_size // 2)
            os.fsync(out_fd)
            pause()
        return real_sendfile(out_fd, in_fd, offset, count)
    os.sendfile = sendfile

    real_copyfileobj = shutil.copyfileobj
    def copyfileobj(fsrc, fdst, length=0):
        if armed:
            data = fsrc.read()
            fdst.write(data[: len(data) // 2])
            fdst.flush()
            pause()
        return real_copyfileobj(fsrc, fdst, length)
    shutil.copyfileobj = copyfileobj

    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if armed and isinstance(f, (str, os.PathLike)):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            pause()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save

    from midol.cli import run_lightning

    cli = run_lightning(["--config", str(config)], run=False)
    checkpoint_io = cli.trainer.strategy.checkpoint_io
    print("checkpoint_io:", type(checkpoint_io).__name__, flush=True)
    last = out / "last.ckpt"
    state = {"state_dict": cli.model.state_dict(), "global_step": 1, "epoch": 0}
    checkpoint_io.save_checkpoint(state, last)
    saved.write_text(hashlib.sha256(last.read_bytes()).hexdigest())
    armed = True
    checkpoint_io.save_checkpoint({**state, "global_step": 2}, last)
''')


def test_checkpoint_write_killed_midway_keeps_previous_last_ckpt(tmp_path: Path) -> None:
    """SIGKILL while the second save of ``last.ckpt`` is half-way through its (slowed) write,
    with $TMPDIR on "another filesystem": the first ``last.ckpt`` is intact, byte for byte, and
    loads; what is left beside it is one hidden ``.last.ckpt.*.tmp``, which no checkpoint search
    picks and the next save removes."""
    out, scratch = tmp_path / "run" / "checkpoints", tmp_path / "scratch"
    out.mkdir(parents=True)
    scratch.mkdir()
    config = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    (tmp_path / "child.py").write_text(CHILD)
    saved, writing = tmp_path / "saved", tmp_path / "writing"
    env = {**midol_env(), "TMPDIR": str(scratch)}
    log = tmp_path / "child.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), str(out), str(scratch), str(saved),
             str(writing), str(config)], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not writing.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = out / "last.ckpt"
    assert hashlib.sha256(last.read_bytes()).hexdigest() == saved.read_text()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    assert "checkpoint_io: AtomicCheckpointIO" in log.read_text()  # what midol fit writes with
    left = sorted(p.name for p in out.iterdir() if p.name != "last.ckpt")
    assert len(left) == 1 and re.fullmatch(r"\.last\.ckpt\.[^/]+\.tmp", left[0]), left
    assert last_checkpoint([out]) == last  # the half-written temp file is never resumed from
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 3}, last)
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_fit_writes_checkpoints_through_atomic_checkpoint_io(tmp_path: Path) -> None:
    cli = run_lightning(["--config", str(tiny_config(tmp_path / "run", num_workers=0))], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    # A CheckpointIO plugin the user gives is kept, and no second one is added.
    mine = AsyncCheckpointIO(TorchCheckpointIO())
    assert with_atomic_checkpoint_io([mine]) == [mine]
    plugins = with_atomic_checkpoint_io(None)
    assert len(plugins) == 1 and isinstance(plugins[0], AtomicCheckpointIO)


def test_damaged_checkpoint_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, good)
    half = tmp_path / "half.ckpt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFileError) as err:
        AtomicCheckpointIO().load_checkpoint(empty)
    assert str(err.value) == f"{empty}: the checkpoint file is empty (0 bytes; its write was interrupted)"
    with pytest.raises(CheckpointFileError, match=re.escape(f"{half}: the checkpoint file is truncated")):
        AtomicCheckpointIO().load_checkpoint(half)


def test_resume_from_empty_last_ckpt_falls_back_to_newest_readable_checkpoint(
    tmp_path: Path, crashed_run: dict[str, Any], record_fit: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    run = _resume_folder(tmp_path, crashed_run)
    ckpt_dir = run / "checkpoints"
    older = ckpt_dir / "epoch=0-step=2.ckpt"
    (ckpt_dir / "last.ckpt").rename(older)
    os.utime(older, (time.time() - 60, time.time() - 60))
    (ckpt_dir / "broken.ckpt").write_bytes(b"PK\x03\x04 not a whole zip file")  # newer: skipped
    os.utime(ckpt_dir / "broken.ckpt", (time.time() - 30, time.time() - 30))
    (ckpt_dir / "last.ckpt").write_bytes(b"")  # what a killed copy into last.ckpt left
    for form in ("last", str(ckpt_dir / "last.ckpt")):
        with pytest.warns(UserWarning) as caught:
            run_lightning(ablation_args(run, "--ckpt_path", form))
        text = " ".join(str(w.message) for w in caught)
        assert (f"{ckpt_dir / 'last.ckpt'}: the checkpoint file is empty (0 bytes; its write was "
                f"interrupted); resuming from {older} instead, the newest readable checkpoint in "
                f"{ckpt_dir}") in text
        assert record_fit[-1]["ckpt_path"] == str(older)
    # Nothing readable left: a one-line error naming the file, not a bare EOFError.
    older.unlink()
    with pytest.raises(CheckpointFileError) as err:
        run_lightning(ablation_args(run, "--ckpt_path", "last"))
    assert str(err.value) == (
        f"{ckpt_dir / 'last.ckpt'}: the checkpoint file is empty (0 bytes; its write was "
        f"interrupted), and {ckpt_dir} holds no other readable checkpoint: start a new run "
        "(--overwrite true) or pass another --ckpt_path")
    assert len(record_fit) == 2


def test_bit_flipped_checkpoint_is_not_resumed(
    tmp_path: Path, crashed_run: dict[str, Any], record_fit: list, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 26, break 11: a bit flip in last.ckpt's tensor data resumed with exit 0 (torch
    does not check the zip CRCs); now it is a damaged checkpoint like a truncated one."""
    monkeypatch.chdir(REPO)
    run = _resume_folder(tmp_path, crashed_run)
    last = run / "checkpoints" / "last.ckpt"
    member = flip_a_bit(last)
    code = main(ablation_args(run, "--ckpt_path", "last"), report=True)
    err = capsys.readouterr().err
    assert code == 3 and record_fit == []
    lines = [line for line in err.splitlines() if line.startswith("midol: error: ")]
    assert lines == [
        f"midol: error: {last}: the checkpoint file is truncated or damaged "
        f"({last.stat().st_size} bytes; member {member} fails its CRC-32 check: it changed after "
        f"it was written, e.g. a bit flip or a bad copy), and {last.parent} holds no other "
        "readable checkpoint: start a new run (--overwrite true) or pass another --ckpt_path"]
    # An intact older checkpoint beside it is resumed instead, with the usual warning.
    older = run / "checkpoints" / "epoch=0.ckpt"
    shutil.copy2(crashed_run["copy"], older)
    os.utime(older, (time.time() - 60, time.time() - 60))
    with pytest.warns(UserWarning, match="fails its CRC-32 check"):
        main(ablation_args(run, "--ckpt_path", "last"))
    assert record_fit[-1]["ckpt_path"] == str(older)


# ------------------------------------------------------------------ item 2: overwrites, one root
def test_rerun_in_a_folder_with_checkpoints_is_refused_unless_resumed_or_overwrite(
    tmp_path: Path, crashed_run: dict[str, Any], record_fit: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    run = _resume_folder(tmp_path, crashed_run)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(UsageError) as err:
        main(ablation_args(run))
    assert str(err.value) == (
        f"{run}/checkpoints already holds checkpoints of a previous run (last.ckpt): resume it "
        "with --ckpt_path last, start over in it with --overwrite true, or choose another folder "
        "with --trainer.default_root_dir")
    assert last.read_bytes() == before and record_fit == []
    main(ablation_args(run, "--overwrite", "true"))
    assert record_fit[-1]["ckpt_path"] is None
    # the previous run's checkpoints are set aside, not deleted (issue 27 item 5: a best-*.ckpt
    # glob then names only the new run's file)
    (aside,) = (run / "checkpoints").glob("replaced-*/last.ckpt")
    assert aside.read_bytes() == before and not last.exists()
    shutil.copy(aside, last)  # what the new run's first epoch writes (fit is recorded, not run)
    main(ablation_args(run, "--ckpt_path", "last"))
    assert record_fit[-1]["ckpt_path"] == str(last)
    # --overwrite is not part of a printed or saved config unless it is given.
    assert "overwrite" not in (REPO / "configs/ablations/base.yaml").read_text()


def test_resuming_another_runs_checkpoint_into_a_folder_with_checkpoints_is_refused(
    tmp_path: Path, crashed_run: dict[str, Any], record_fit: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26, break 1: ``--ckpt_path`` of run A with run B's folder used to skip the
    overwrite refusal and replace B's newer last.ckpt with A's."""
    monkeypatch.chdir(REPO)
    run_b = _resume_folder(tmp_path, crashed_run)
    last_b = run_b / "checkpoints" / "last.ckpt"
    before = last_b.read_bytes()
    ckpt_a = crashed_run["copy"]  # run A's checkpoint, in A's own folder
    with pytest.raises(UsageError) as err:
        main(ablation_args(run_b, "--ckpt_path", str(ckpt_a)))
    assert str(err.value) == (
        f"--ckpt_path {ckpt_a} is a checkpoint of another run ({ckpt_a.parent}), and this run's "
        f"folder {run_b}/checkpoints already holds checkpoints of a previous run (last.ckpt) that "
        "resuming would replace: resume that run in its own folder, choose an empty folder with "
        "--trainer.default_root_dir, or replace them with --overwrite true")
    assert last_b.read_bytes() == before and record_fit == []
    # B's own checkpoint (by path) resumes; A's resumes into an empty folder, or with --overwrite.
    main(ablation_args(run_b, "--ckpt_path", str(last_b)))
    assert record_fit[-1]["ckpt_path"] == str(last_b)
    main(ablation_args(tmp_path / "fresh", "--ckpt_path", str(ckpt_a)))
    assert record_fit[-1]["ckpt_path"] == str(ckpt_a)
    main(ablation_args(run_b, "--ckpt_path", str(ckpt_a), "--overwrite", "true"))
    assert record_fit[-1]["ckpt_path"] == str(ckpt_a)


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(300)
""")


@pytest.mark.skipif(os.name != "posix", reason="fcntl locks are POSIX")
def test_a_second_fit_into_a_run_folder_in_use_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26, break 3: two fits into one folder were both let through (one's clean-up of
    temporary files deleted the other's checkpoint)."""
    import fcntl

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".midol-fit.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        fits: list[bool] = []
        monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: fits.append(True))
        started = time.monotonic()
        with pytest.raises(UsageError) as err:
            main(ablation_args(run))
        assert time.monotonic() - started < 60  # at once, not after waiting for the other
        assert str(err.value) == (
            f"{run} is in use by another midol fit (PID {holder.pid}; lock file {lock}): wait "
            "for it to end, or choose another folder with --trainer.default_root_dir")
        assert fits == []
    finally:
        holder.kill()  # the kernel drops a killed process's lock
        holder.wait()

    def fit_while_checking_the_lock(*args: Any, **kwargs: Any) -> None:
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # held by this fit for its whole length
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert lock.read_text() == f"{os.getpid()}\n"
        fits.append(True)

    monkeypatch.setattr(L.Trainer, "fit", fit_while_checking_the_lock)
    main(ablation_args(run))
    main(ablation_args(run, "--overwrite", "true"))  # released when the first fit ended
    assert fits == [True, True]


def _outputs(cli) -> dict[str, Any]:
    cbs = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    return {
        "checkpoints": sorted({cb.dirpath for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)}),
        "export": cbs["ExportBackbone"].dirpath or cli.trainer.default_root_dir,
        "routing": cbs["RoutingMonitor"].image_dir,
        "summary": cbs["PretrainSummary"].output_dir or cli.trainer.default_root_dir,
        "logs": cli.trainer.logger.log_dir,
    }


def test_default_root_dir_moves_every_output_of_the_demo_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    shipped = _outputs(run_lightning(["--config", "configs/pretrain/demo.yaml"], run=False))
    demo = "outputs/demo"
    assert shipped == {"checkpoints": [str(REPO / demo / "checkpoints")], "export": demo,
                       "routing": f"{demo}/routing", "summary": demo,
                       "logs": shipped["logs"]}  # make demo: the same paths as before
    assert Path(shipped["logs"]).parent == Path(demo) / "logs"
    moved = _outputs(run_lightning(["--config", "configs/pretrain/demo.yaml",
                                    "--trainer.default_root_dir", str(tmp_path / "elsewhere")],
                                   run=False))
    root = tmp_path / "elsewhere"
    assert moved["checkpoints"] == [str(root / "checkpoints")]
    assert (moved["export"], moved["routing"], moved["summary"]) == (
        str(root), str(root / "routing"), str(root))
    assert Path(moved["logs"]).parent == root / "logs"


# ------------------------------------------------------------------ item 3: config wins on resume
@pytest.mark.parametrize("form", ["file", "last"])
def test_resume_keeps_command_line_settings_and_names_those_that_differ(
    tmp_path: Path, crashed_run: dict[str, Any], record_fit: list,
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.chdir(REPO)
    run = _resume_folder(tmp_path, crashed_run)
    last = run / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if form == "file" else "last"
    with pytest.warns(UserWarning) as caught:
        cli = run_lightning(ablation_args(run, "--ckpt_path", ckpt_path,
                                          "--model.init_args.base_lr", "0.02",
                                          "--model.init_args.route_weight", "0.5"))
    assert cli.model.hparams.base_lr == 0.02 and cli.model.hparams.route_weight == 0.5
    assert record_fit[-1]["ckpt_path"] == str(last)
    text = [str(w.message) for w in caught if "differ from the checkpoint" in str(w.message)]
    assert text == [(f"{last}: the config sets 2 setting(s) that differ from the checkpoint's "
                     "hyper-parameters; the config's values are used: route_weight (checkpoint "
                     "1.0, now 0.5), base_lr (checkpoint 0.002, now 0.02)")]


def test_resume_with_a_setting_that_changes_shapes_fails_naming_it(
    tmp_path: Path, crashed_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    run = _resume_folder(tmp_path, crashed_run)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(UsageError) as err:
        main(ablation_args(run, "--ckpt_path", str(last), "--model.init_args.num_experts", "4",
                           "--trainer.max_epochs", "1"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{last}: its weights do not fit the module the config builds (")
    assert message.endswith(
        "settings that differ from the checkpoint's hyper-parameters: num_experts (checkpoint 3, "
        "now 4); a resume cannot change a setting that shapes the weights: use the checkpoint's "
        "value or start a new run")
    assert last.read_bytes() == before


# ------------------------------------------------------------------ item 5: imports
@pytest.mark.parametrize("class_path", ["ckpt_probe.Probe", "os.system"])
def test_checkpoint_class_path_outside_midol_is_refused_not_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_fit: list, class_path: str
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_probe.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Probe:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ckpt_probe", raising=False)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path, "base_lr": 1.0}},
               evil)
    config = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    with pytest.raises(UsageError) as err:
        run_lightning(["fit", "--config", str(config), "--ckpt_path", str(evil)])
    assert str(err.value) == (
        f"{evil}: its hyper-parameters name the module class {class_path!r}, outside midol, and "
        "the config's is 'midol.methods.PretrainModule'; midol does not import a class a "
        "checkpoint chooses: set model.class_path to it in the config if you trust that code")
    assert not marker.exists() and record_fit == []
    # midol route (and analyze, export) read checkpoints through load_method, which refuses too.
    with pytest.raises(ValueError, match=re.escape(f"its module class {class_path!r} is outside midol")):
        main(["route", str(evil), "--folder", str(REPO / "sample_data/xray"),
              "--out", str(tmp_path / "routes.csv")])
    assert not marker.exists()


# ------------------------------------------------------------------ item 7: unwritable outputs
@pytest.mark.parametrize("which", ["checkpoints", "logger"])
def test_unwritable_output_folder_fails_before_training(
    tmp_path: Path, record_fit: list, which: str
) -> None:
    config = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    data = yaml.safe_load(config.read_text())
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = blocker / "sub"
    if which == "checkpoints":
        for cb in data["trainer"]["callbacks"][:2]:
            cb["init_args"]["dirpath"] = str(bad)
        what = "ModelCheckpoint dirpath"
    else:
        data["trainer"]["logger"]["init_args"]["save_dir"] = str(bad)
        what = "CSVLogger save_dir"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(OutputFolderError) as err:
        main(["fit", "--config", str(config)])
    assert str(err.value) == (f"{bad}: the run's output folder ({what}) cannot be created: "
                              f"{blocker} is a file, not a folder")
    assert record_fit == []  # refused before training
    assert not (tmp_path / "run" / "checkpoints").exists()  # the check creates nothing


# ------------------------------------------------------------------ item 9: epoch-end checkpoints
PRESETS = sorted(
    p for folder in ("pretrain", "ablations", "finetune", "finetune/paper", "fusion")
    for p in (REPO / "configs" / folder).glob("[!_]*.yaml")
)


def saves_last_at_every_epoch_end(cb: ModelCheckpoint) -> bool:
    """Whether ``cb`` writes a ``last*.ckpt`` at every training-epoch end under Lightning 2.6:
    a top-k save needs save_top_k != 0 and no monitor (a monitored one saves only on
    improvement, and save_last follows a top-k save); the file is last.ckpt when named so."""
    return (cb.monitor is None and cb.save_top_k != 0 and cb.every_n_epochs == 1
            and cb._every_n_train_steps == 0 and cb._train_time_interval is None
            and cb._save_on_train_epoch_end is True
            and (cb.filename == "last" and not cb._enable_version_counter or bool(cb.save_last)))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_preset_writes_last_ckpt_at_each_epoch_end(preset: Path) -> None:
    callbacks = load_composed(preset)["trainer"]["callbacks"]
    checkpoints = [ModelCheckpoint(**(cb.get("init_args") or {})) for cb in callbacks
                   if cb["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"]
    assert any(saves_last_at_every_epoch_end(cb) for cb in checkpoints)
    # A save_top_k: 0 callback without a step trigger saves nothing before the end of fit.
    assert not any(cb.save_top_k == 0 and cb._every_n_train_steps == 0 for cb in checkpoints)


def test_presets_are_all_checked() -> None:
    names = {str(p.relative_to(REPO / "configs")) for p in PRESETS}
    assert {"pretrain/demo.yaml", "ablations/base.yaml", "finetune/isic9_finetune.yaml",
            "finetune/paper/chexpert.yaml", "fusion/medmix_odir.yaml"} <= names


def test_ablation_preset_crash_after_an_epoch_leaves_resumable_last_ckpt(
    crashed_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the shipped settings of 0.1.0 (save_last with save_top_k: 0) this run left no
    checkpoint at all; now last.ckpt holds the finished epoch 0 and the run resumes from it."""
    last = crashed_run["last"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)
    monkeypatch.chdir(REPO)
    main(ablation_args(crashed_run["root"], "--ckpt_path", "last"))
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 2 * STEPS_PER_EPOCH)
    assert resumed["hyper_parameters"]["num_experts"] == 3


def test_run_id_gives_each_run_its_own_folder(tmp_path, monkeypatch):
    """Sweep runs of one preset must not meet each other's checkpoints (the overwrite guard
    would stop the second): --run_id moves every output under <root>/<run id>."""
    from midol.cli import resolve_run_id, run_lightning
    from midol.errors import UsageError

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    cli = run_lightning(["--config", "configs/pretrain/demo.yaml", "--run_id", "auto",
                         "--trainer.default_root_dir", str(tmp_path / "runs")], run=False)
    root = tmp_path / "runs" / "abc123"
    assert cli.trainer.default_root_dir == str(root)
    ckpts = {cb.dirpath for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"}
    assert ckpts == {str(root / "checkpoints")}
    assert cli.trainer.logger.save_dir == str(root)
    monkeypatch.delenv("WANDB_RUN_ID")
    assert len(resolve_run_id("auto")) == len("20261203-084100")
    with pytest.raises(UsageError, match="one folder name"):
        resolve_run_id("a/b")


@pytest.mark.parametrize("value", ["../..", "..", "a/../../b", "x\\..\\y"])
def test_run_id_from_the_environment_cannot_leave_the_root(value, monkeypatch):
    """Issue 26 item 16: WANDB_RUN_ID=../.. was taken as the run folder by --run_id auto."""
    from midol.cli import resolve_run_id
    from midol.errors import UsageError

    monkeypatch.setenv("WANDB_RUN_ID", value)
    with pytest.raises(UsageError, match=r"--run_id auto \(from WANDB_RUN_ID\) must be one folder name"):
        resolve_run_id("auto")


def test_run_id_auto_with_ckpt_path_last_resumes_the_newest_run(tmp_path, monkeypatch):
    """Issue 27 item 8: `--run_id auto --ckpt_path last` (a requeue script) started a fresh run in
    a new folder; it now resumes the run whose checkpoints are newest, or refuses in one line."""
    import os

    from midol.cli import resolve_run_id, run_lightning
    from midol.errors import UsageError

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    runs = tmp_path / "runs"
    with pytest.raises(UsageError, match=r"no run under .* has a checkpoint to resume"):
        resolve_run_id("auto", str(runs))
    for name, stamp in (("20261201-080000", 1_000), ("20261202-080000", 3_000), ("20261203-080000", 2_000)):
        (runs / name / "checkpoints").mkdir(parents=True)
        ckpt = runs / name / "checkpoints" / "last.ckpt"
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (stamp, stamp))
    assert resolve_run_id("auto", str(runs)) == "20261202-080000"
    assert resolve_run_id("auto") != "20261202-080000"  # without --ckpt_path last: a new run
    cli = run_lightning(["--config", "configs/pretrain/demo.yaml", "--run_id", "auto",
                         "--trainer.default_root_dir", str(runs)], run=False)
    assert cli.trainer.default_root_dir.startswith(str(runs))


def test_ckpt_path_last_takes_the_newer_of_last_and_a_slurm_hpc_save(tmp_path: Path) -> None:
    """Lightning's SLURM environment saves ``hpc_ckpt_N.ckpt`` in the run folder on the signal of
    ``#SBATCH --signal=USR1@N``; ``--ckpt_path last`` must not resume from an older last.ckpt."""
    root = tmp_path / "run"
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True)
    last = ckpts / "last.ckpt"
    last.write_bytes(b"x")
    hpc = root / "hpc_ckpt_3.ckpt"
    hpc.write_bytes(b"y")
    os.utime(last, (1_000, 1_000))
    os.utime(hpc, (2_000, 2_000))
    assert last_checkpoint([ckpts], root) == hpc
    assert last_checkpoint([ckpts]) == last  # without the run folder: Lightning's own rule
    os.utime(last, (3_000, 3_000))
    assert last_checkpoint([ckpts], root) == last
    (root / "hpc_ckpt_notes.ckpt").write_bytes(b"z")  # not Lightning's name: never picked
    os.utime(root / "hpc_ckpt_notes.ckpt", (9_000, 9_000))
    assert last_checkpoint([ckpts], root) == last
