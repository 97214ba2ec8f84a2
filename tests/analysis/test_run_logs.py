"""`midol analyze` draws the loss curves of the run that wrote the checkpoint (issue 27, item 3):
checkpoints record their run's CSVLogger folders; a second run started in the same folder
(`--overwrite true`) or a resume does not make analyze read another run's metrics.csv."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from midol.cli import main
from midol.utils.run_logs import LOG_DIRS_KEY, run_metrics_files
from tests.helpers.faults import tiny_config
from tests.helpers.tiny import SAMPLE_DATA


def last_logged(metrics: Path, key: str) -> float:
    with open(metrics, newline="") as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)][-1]


def fit(config: Path, *extra: str) -> None:
    assert main(["fit", "--config", str(config), "--threads", "1", *extra]) == 0


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    """Run A (1 epoch, then resumed to 2: logs/version_0 and version_1), then run B started
    over in the same folder (--overwrite true, another seed: logs/version_2). A's last
    checkpoint is kept beside B's as checkpoints/run-a.ckpt."""
    run = tmp_path_factory.mktemp("reruns") / "run"
    config = tiny_config(run, max_epochs=1, num_workers=0, deterministic=False)
    fit(config)
    fit(config, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    kept = run.parent / "run-a.ckpt"
    shutil.copy2(run / "checkpoints" / "last.ckpt", kept)
    fit(config, "--overwrite", "true", "--seed_everything", "1")
    shutil.move(kept, run / "checkpoints" / "run-a.ckpt")
    return {"run": run, "a": run / "checkpoints" / "run-a.ckpt", "b": run / "checkpoints" / "last.ckpt"}


def test_checkpoints_record_their_runs_log_folders(two_runs):
    logs = (two_runs["run"] / "logs").resolve()
    a = torch.load(two_runs["a"], map_location="cpu", weights_only=True)
    b = torch.load(two_runs["b"], map_location="cpu", weights_only=True)
    # the resumed run lists the folder of the fit it continued first
    assert a[LOG_DIRS_KEY]["dirs"] == [str(logs / "version_0"), str(logs / "version_1")]
    assert b[LOG_DIRS_KEY]["dirs"] == [str(logs / "version_2")]
    assert a[LOG_DIRS_KEY]["root"] == str(two_runs["run"].resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess, no warning
        assert run_metrics_files(two_runs["a"], a) == [logs / "version_0" / "metrics.csv",
                                                       logs / "version_1" / "metrics.csv"]


def test_analyze_of_the_first_runs_checkpoint_reads_the_first_runs_metrics(two_runs, tmp_path):
    run = two_runs["run"]
    newest = run / "logs" / "version_2" / "metrics.csv"  # run B's: what analyze read before
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  init_args:\n    transform: {init_args: {global_size: 32}}\n    sources:\n"
                    f"      - {{path: {SAMPLE_DATA / 'xray'}, modality: xray}}\n"
                    f"      - {{path: {SAMPLE_DATA / 'pathology'}, modality: pathology}}\n")
    out = tmp_path / "analysis"
    assert main(["analyze", str(two_runs["a"]), "--data", str(data), "--out", str(out),
                 "--per-modality", "3", "--embedding", "pca", "--gradcam-per-modality", "0",
                 "--no-progress"]) == 0
    curves = json.loads((out / "analysis.json").read_text())["loss_curves"]
    own = [str((run / "logs" / v / "metrics.csv").resolve()) for v in ("version_0", "version_1")]
    assert curves["metrics"] == own
    finals = {k: v for k, v in curves.items() if k.startswith("final_")}
    assert finals, curves
    for name, value in finals.items():
        key = f"train/{name[len('final_'):]}"
        assert value == pytest.approx(last_logged(Path(own[1]), key))  # run A's last value
        assert value != pytest.approx(last_logged(newest, key))  # not run B's


def test_a_checkpoint_without_the_record_falls_back_to_the_newest_file_with_a_warning(two_runs):
    b = torch.load(two_runs["b"], map_location="cpu", weights_only=True)
    del b[LOG_DIRS_KEY]
    with pytest.warns(UserWarning, match="does not record its run's log folders.*may be another run's"):
        found = run_metrics_files(two_runs["b"], b)
    assert found == [max((two_runs["run"] / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)]


def test_a_moved_run_folder_is_found_from_the_checkpoints_place(two_runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(two_runs["run"], moved)
    ckpt = torch.load(moved / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt[LOG_DIRS_KEY]["dirs"] = [d.replace(str(two_runs["run"].resolve()), "/gone/run")
                                  for d in ckpt[LOG_DIRS_KEY]["dirs"]]
    ckpt[LOG_DIRS_KEY]["root"] = "/gone/run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_metrics_files(moved / "checkpoints" / "last.ckpt", ckpt) == [
            moved.resolve() / "logs" / "version_2" / "metrics.csv"]
