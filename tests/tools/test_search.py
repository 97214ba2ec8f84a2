"""`midol search` (issue 27, item 10): a local hyper-parameter search over a W&B sweep file's
parameters without a W&B server. The sweep translation for each distribution; a planted toy
objective whose runs peak early and then fall, so the search must rank on the best validation,
not the last; resume; a failing trial; one-line errors. The trial runner is replaced by the toy
(no training) except in the slow test, which runs two real tiny fits."""

from __future__ import annotations

import csv
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial

from midol.cli import main
from midol.errors import MidolError, UsageError
from midol.tools import search_trial
from midol.tools.search_space import (
    format_arg,
    fragment,
    grid_points,
    load_sweep,
    parse_param,
    suggest,
)
from midol.tools.search_trial import MetricMissing, TrialError, Validation, best_of, read_history
from tests.helpers.paths import REPO_ROOT

X, Y = "model.init_args.x", "model.init_args.y"
PLANTED = {"x": 0.7, "y": "b"}  # the toy's best-validation optimum


def write_sweep(tmp_path: Path, parameters: dict[str, Any], method: str = "bayes",
                goal: str = "maximize", metric: str = "best/val/score") -> Path:
    preset = tmp_path / "preset.yaml"
    preset.write_text("trainer: {max_epochs: 4}\n")
    sweep = {"program": "midol", "method": method, "metric": {"name": metric, "goal": goal},
             "parameters": parameters,
             "command": ["${env}", "midol", "fit", "--config", str(preset), "${args}"]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


TOY_SPACE = {X: {"distribution": "uniform", "min": 0.0, "max": 1.0},
             Y: {"values": ["a", "b", "c"]}}


def toy_history(x: float, y: str) -> list[float]:
    """Peaks at epoch 1 at 1 - 4 (x - 0.7)^2 (- 0.3 unless y is b), then falls by 1.5 x per
    epoch: ranked on the last epoch, a small x would win (x ~ 0.33), on the best x ~ 0.7."""
    peak = 1.0 - 4.0 * (x - PLANTED["x"]) ** 2 - (0.0 if y == PLANTED["y"] else 0.3)
    return [peak - 0.2, peak, peak - 1.5 * x, peak - 3.0 * x]


def toy_runner(calls: list[int] | None = None, fail: dict[int, str] | None = None):
    def run(trial: search_trial.TrialRun) -> list[Validation]:
        if calls is not None:
            calls.append(trial.number)
        if fail and trial.number in fail:
            if fail[trial.number] == "nan":
                return [Validation(0, 10, math.nan), Validation(1, 20, math.nan)]
            raise RuntimeError(fail[trial.number])
        values = toy_history(trial.overrides[X], trial.overrides[Y])
        return [Validation(e, 10 * (e + 1), v) for e, v in enumerate(values)]
    return run


def search(sweep: Path, out: Path, *args: str) -> int:
    return main(["search", str(sweep), "--trials", *args[:1], "--out", str(out), *args[1:]])


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "search.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def table_rows(out: Path) -> list[list[str]]:
    lines = (out / "search.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| rank |"))
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[start + 2:]
            if ln.startswith("|")]


# --- (1) the sweep file's distributions as Optuna suggestions ------------------------------

def test_each_distribution_kind_against_a_fixed_trial():
    spec = {
        "model.init_args.optimizer": {"values": ["adamw", "sgd"]},
        "model.init_args.backbone_kwargs": {"values": [{"drop_path_rate": 0.1},
                                                       {"drop_path_rate": 0.2}]},
        "model.init_args.dice_weight": {"distribution": "uniform", "min": 0.0, "max": 2.0},
        "model.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
        "model.init_args.warmup_epochs": {"distribution": "int_uniform", "min": 2, "max": 10},
        "model.init_args.mixup_alpha": {"distribution": "q_uniform", "min": 0.0, "max": 1.0,
                                        "q": 0.25},
        "data.init_args.batch_size": {"distribution": "q_uniform", "min": 16, "max": 64, "q": 16},
        "model.init_args.layers": {"min": 1, "max": 4},  # W&B infers int_uniform
        "model.init_args.wd": {"distribution": "log_uniform", "min": math.log(1e-3), "max": 0.0},
        "seed_everything": {"value": 3},
    }
    params = [parse_param(name, s) for name, s in spec.items()]
    trial = FixedTrial({"model.init_args.optimizer": "sgd",
                        "model.init_args.backbone_kwargs": '{"drop_path_rate": 0.2}',
                        "model.init_args.dice_weight": 1.5, "model.init_args.lr": 1e-3,
                        "model.init_args.warmup_epochs": 7, "model.init_args.mixup_alpha": 0.75,
                        "data.init_args.batch_size": 48, "model.init_args.layers": 2,
                        "model.init_args.wd": 0.01})
    values = suggest(params, trial)
    assert values == {"model.init_args.optimizer": "sgd",
                      "model.init_args.backbone_kwargs": {"drop_path_rate": 0.2},
                      "model.init_args.dice_weight": 1.5, "model.init_args.lr": 1e-3,
                      "model.init_args.warmup_epochs": 7, "model.init_args.mixup_alpha": 0.75,
                      "data.init_args.batch_size": 48, "model.init_args.layers": 2,
                      "model.init_args.wd": 0.01, "seed_everything": 3}
    assert isinstance(values["model.init_args.warmup_epochs"], int)
    dist = trial.distributions
    assert dist["model.init_args.optimizer"] == CategoricalDistribution(["adamw", "sgd"])
    assert dist["model.init_args.dice_weight"] == FloatDistribution(0.0, 2.0)
    assert dist["model.init_args.lr"] == FloatDistribution(1e-4, 3e-3, log=True)
    assert dist["model.init_args.warmup_epochs"] == IntDistribution(2, 10)
    assert dist["model.init_args.mixup_alpha"] == FloatDistribution(0.0, 1.0, step=0.25)
    assert dist["data.init_args.batch_size"] == IntDistribution(16, 64, step=16)
    assert dist["model.init_args.layers"] == IntDistribution(1, 4)
    assert dist["model.init_args.wd"].log and dist["model.init_args.wd"].low == pytest.approx(1e-3)
    assert "seed_everything" not in dist  # a constant is passed, not searched
    # the values as W&B's ${args} writes them, and as a nested config fragment
    assert format_arg(3e-05) == "3.0e-05" and format_arg(True) == "true"
    assert format_arg({"drop_path_rate": 0.2}) == "{drop_path_rate: 0.2}"
    assert fragment({"model.init_args.lr": 1e-3, "seed_everything": 3}) == {
        "model": {"init_args": {"lr": 1e-3}}, "seed_everything": 3}


def test_grid_points_and_the_shipped_sweep_files():
    params = [parse_param("a", {"values": [1, 2]}),
              parse_param("b", {"distribution": "q_uniform", "min": 0.1, "max": 0.3, "q": 0.1}),
              parse_param("c", {"value": "fixed"})]
    assert grid_points(params) == [{"a": 1, "b": 0.1}, {"a": 1, "b": 0.2}, {"a": 1, "b": 0.3},
                                   {"a": 2, "b": 0.1}, {"a": 2, "b": 0.2}, {"a": 2, "b": 0.3}]
    with pytest.raises(UsageError, match="continuous"):
        grid_points([parse_param("lr", {"distribution": "uniform", "min": 0.0, "max": 1.0})])
    for path in sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(str(path))
        assert sweep.metric.startswith("best/") and sweep.column == sweep.metric[5:]
        assert sweep.configs and all((REPO_ROOT / c).is_file() for c in sweep.configs), path
        suggest(sweep.params, optuna.trial.FixedTrial(
            {p.name: p.encoded[0] if p.kind == "categorical" else p.low for p in sweep.swept}))


def test_best_of_a_csv_logger_history_is_the_best_not_the_last(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/auc,val/loss\n"
                    "0,9,0.9,,\n0,9,,0.70,0.6\n1,19,,0.81,0.5\n1,19,0.5,,\n"
                    "2,29,,0.76,0.7\n3,39,,nan,\n")
    history = read_history(path, "val/auc")
    assert [v.value for v in history][:3] == [0.70, 0.81, 0.76]
    best = best_of(history, "maximize")
    assert (best.value, best.epoch, best.step) == (0.81, 1, 19)
    assert best_of(read_history(path, "val/loss"), "minimize").epoch == 1
    with pytest.raises(MetricMissing, match="val/auc, val/loss"):
        read_history(path, "val/dice")
    with pytest.raises(TrialError, match="no finite value"):
        best_of([Validation(0, 1, math.nan)], "maximize")
    log = tmp_path / "fit.log"
    log.write_text("Seed set to 0\nmidol: error: model.init_args.lr must be > 0\n")
    assert search_trial.error_line(log, 2) == (
        "midol fit exited with status 2: midol: error: model.init_args.lr must be > 0")


# --- (2) the planted toy objective ---------------------------------------------------------

def test_planted_objective_found_and_ranked_on_best_not_last(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search_trial, "run_trial", toy_runner())
    sweep, out = write_sweep(tmp_path, TOY_SPACE), tmp_path / "search"
    assert search(sweep, out, "16", "--seed", "0", "--", "--trainer.max_epochs", "4") == 0
    printed = capsys.readouterr().out
    assert printed.count("] trial ") == 32  # a start and an end line per trial
    rows = csv_rows(out)
    assert len(rows) == 16 and all(r["status"] == "complete" for r in rows)
    best = {int(r["trial"]): float(r["best val/score"]) for r in rows}
    last = {int(r["trial"]): float(r["last val/score"]) for r in rows}
    top = max(best, key=best.__getitem__)
    assert max(last, key=last.__getitem__) != top  # the planted problem separates them
    table = table_rows(out)
    assert table[0][:2] == ["1", str(top)]  # ranked on the best value
    assert [int(r[1]) for r in table] == sorted(best, key=lambda t: -best[t])
    row = next(r for r in rows if int(r["trial"]) == top)
    assert abs(float(row[X]) - PLANTED["x"]) < 0.2 and row[Y] == PLANTED["y"]
    assert row["epoch"] == "1" and row["step"] == "20"  # where the run peaked
    assert best[top] > 0.85
    fragment_ = yaml.safe_load((out / "best.yaml").read_text())
    assert fragment_["model"]["init_args"]["x"] == pytest.approx(float(row[X]))
    assert "--trainer.max_epochs 4" in row["command"] and f"trials/{top}" in row["command"]
    for name in ("search.md", "search.csv", "best.yaml"):
        assert str(out / name) in printed


def test_grid_runs_each_combination_once(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(search_trial, "run_trial", toy_runner(calls))
    sweep = write_sweep(tmp_path, {X: {"values": [0.2, 0.7]}, Y: {"values": ["a", "b"]}},
                        method="grid")
    assert search(sweep, tmp_path / "g", "10") == 0
    rows = csv_rows(tmp_path / "g")
    assert len(calls) == 4 and len({(r[X], r[Y]) for r in rows}) == 4
    assert (rows[0][X], rows[0][Y]) == ("0.7", "b")


# --- (3) resume ------------------------------------------------------------------------------

def test_rerun_resumes_and_counts_the_total(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(search_trial, "run_trial", toy_runner(calls))
    sweep, out = write_sweep(tmp_path, TOY_SPACE), tmp_path / "search"
    assert search(sweep, out, "5") == 0
    first = {r["trial"]: r for r in csv_rows(out)}
    assert calls == [0, 1, 2, 3, 4]
    assert search(sweep, out, "8") == 0
    assert calls == [0, 1, 2, 3, 4, 5, 6, 7]  # the first 5 were not run again
    rows = {r["trial"]: r for r in csv_rows(out)}
    assert len(rows) == 8
    for number, row in first.items():
        assert {k: rows[number][k] for k in (X, Y, "best val/score")} == {
            k: row[k] for k in (X, Y, "best val/score")}
    # a trial a killed search left running is 'interrupted', not counted, and replaced
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'search.db'}")
    study.ask()
    assert search(sweep, out, "9") == 0
    assert calls[-1] == 9
    status = {r["trial"]: r["status"] for r in csv_rows(out)}
    assert status["8"] == "interrupted" and status["9"] == "complete"
    assert "1 interrupted (not counted)" in (out / "search.md").read_text()
    # the study belongs to its sweep: another metric is refused in one line
    other = write_sweep(tmp_path, TOY_SPACE, metric="best/val/other")
    with pytest.raises(UsageError, match="another metric"):
        search(other, out, "10")


# --- (4) a failing trial -------------------------------------------------------------------

def test_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(search_trial, "run_trial", toy_runner(
        calls, fail={1: "CUDA out of memory\n  traceback line", 2: "nan"}))
    sweep, out = write_sweep(tmp_path, TOY_SPACE), tmp_path / "search"
    assert search(sweep, out, "5") == 0
    assert calls == [0, 1, 2, 3, 4]
    rows = {r["trial"]: r for r in csv_rows(out)}
    assert rows["1"]["status"] == "failed"
    assert rows["1"]["error"] == "RuntimeError: CUDA out of memory"
    assert rows["2"]["status"] == "failed" and "no finite value" in rows["2"]["error"]
    assert [rows[t]["status"] for t in "034"] == ["complete"] * 3
    assert "| failed: RuntimeError: CUDA out of memory |" in (out / "search.md").read_text()
    # failed trials count towards --trials: a rerun runs none
    assert search(sweep, out, "5") == 0 and len(calls) == 5


def test_metric_never_logged_stops_the_search(tmp_path, monkeypatch):
    def runner(trial: search_trial.TrialRun) -> list[Validation]:
        raise MetricMissing("metric val/score was not logged (metrics.csv has val/auc)")

    monkeypatch.setattr(search_trial, "run_trial", runner)
    sweep = write_sweep(tmp_path, TOY_SPACE)
    with pytest.raises(UsageError, match="trial 0: metric val/score was not logged"):
        search(sweep, tmp_path / "search", "5")
    assert len(csv_rows(tmp_path / "search")) == 1


# --- (5) one-line errors ---------------------------------------------------------------------

def test_unknown_distribution_is_a_one_line_error(tmp_path, capsys):
    sweep = write_sweep(tmp_path, {X: {"distribution": "normal", "mu": 0, "sigma": 1}})
    code = main(["search", str(sweep), "--trials", "3", "--out", str(tmp_path / "s")], report=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("midol: error: sweep parameter model.init_args.x: distribution "
                             "'normal' is not supported")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("extra", "match"), [
    (["--", f"--{X}=0.5"], "the sweep file searches it"),
    (["--", "--trainer.default_root_dir", "x"], "each trial's folder"),
    (["--config", "missing.yaml"], "no such file"),
    (["--sampler", "grid"], "continuous"),
])
def test_options_that_cannot_work_are_refused(tmp_path, extra, match):
    sweep = write_sweep(tmp_path, TOY_SPACE)
    with pytest.raises(MidolError, match=match):
        search(sweep, tmp_path / "s", "3", *extra)


def test_without_optuna_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(UsageError, match=r"needs Optuna: pip install 'midol\[search\]'"):
        search(write_sweep(tmp_path, TOY_SPACE), tmp_path / "s", "3")
    assert not (tmp_path / "s").exists()


def test_timeout_starts_no_trial_after_it(tmp_path, monkeypatch):
    toy = toy_runner()

    def slow(trial: search_trial.TrialRun) -> list[Validation]:
        time.sleep(0.2)
        return toy(trial)

    monkeypatch.setattr(search_trial, "run_trial", slow)
    out = tmp_path / "s"
    assert search(write_sweep(tmp_path, TOY_SPACE), out, "10", "--timeout_min", "0.001") == 0
    assert len(csv_rows(out)) == 1  # the first trial ran past the 60 ms; no second one started
    assert "--timeout_min 0.001 reached" in (out / "search.md").read_text()


def test_readme_command(tmp_path, monkeypatch):
    """The README's `midol search` command, with the toy runner and one trial."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Hyper-parameter search: W&B sweeps or `midol search`"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:2] == ["midol", "search"]
    argv[argv.index("--out") + 1] = str(tmp_path / "s")
    argv[argv.index("--trials") + 1] = "1"
    runs: list[search_trial.TrialRun] = []

    def runner(trial: search_trial.TrialRun) -> list[Validation]:
        runs.append(trial)
        return [Validation(0, 5, 0.5), Validation(1, 11, 0.6)]

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(search_trial, "run_trial", runner)
    assert main(argv[1:]) == 0
    (run,) = runs
    assert run.metric == "val/auc" and run.argv[:3] == [
        "fit", "--config", "configs/finetune/retinamnist_finetune.yaml"]
    assert "--trainer.max_epochs" in run.argv and "model.init_args.lr" in run.overrides


# --- a real search: two tiny fits ----------------------------------------------------------

@pytest.mark.slow
def test_two_real_trials_of_a_tiny_fit(tmp_path):
    from tests.helpers.finetune import SIZE, SWIN
    from tests.helpers.tiny import SAMPLE_DATA, TINY_SWIN

    preset = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 2,
            "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "preset"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "preset"), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"monitor": "val/auc", "mode": "max",
                                         "filename": "best"}}],
        },
        "model": {"class_path": "midol.tasks.ClassificationModule",
                  "init_args": {"num_classes": 2, "backbone": SWIN,
                                "backbone_kwargs": dict(TINY_SWIN), "lr": 1e-3}},
        "data": {"class_path": "midol.data.LabelledDataModule",
                 "init_args": {"train": {"path": str(SAMPLE_DATA / "xray")}, "val_fraction": 0.3,
                               "image_size": SIZE, "batch_size": 8, "num_workers": 0}},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(preset))
    sweep = write_sweep(tmp_path, {"model.init_args.lr": {"values": [1e-3, 3e-3]}},
                        method="grid", metric="best/val/auc")
    out = tmp_path / "search"
    start = time.perf_counter()
    assert main(["search", str(sweep), "--config", str(config), "--trials", "2", "--out",
                 str(out), "--", "--threads", "1"]) == 0
    print(f"two real trials: {time.perf_counter() - start:.1f} s")
    rows = csv_rows(out)
    assert [r["status"] for r in rows] == ["complete", "complete"], rows
    for row in rows:
        logged = sorted((out / "trials" / row["trial"]).rglob("metrics.csv"))
        assert len(logged) == 1 and row["validations"] == "2"
        values = [v.value for v in read_history(logged[0], "val/auc")]
        assert float(row["best val/auc"]) == max(values)
    lr = yaml.safe_load((out / "best.yaml").read_text())["model"]["init_args"]["lr"]
    assert lr == float(rows[0]["model.init_args.lr"])
