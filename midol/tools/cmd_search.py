"""``midol search SWEEP.yaml --trials N --out DIR [--config PRESET ...] [-- FIT OPTIONS]``: a
hyper-parameter search on this machine, without a W&B account or server (Optuna, SQLite).

It reads a W&B sweep file (configs/sweeps/*.yaml): its ``parameters`` are the search space (dotted
``midol fit`` options), its ``metric`` and ``goal`` the objective, its ``method`` the default
sampler (bayes: TPE, random, grid) and its command's ``--config`` the default presets. Each trial
is one ``midol fit`` in ``DIR/trials/<trial>/``; its score is the BEST value of the metric over the
run's validations (its CSVLogger's metrics.csv; ``best/val/auc`` reads ``val/auc``), not the
last. A failed trial is recorded with its error and the search goes on. ``DIR/search.db`` keeps
the study: the same command again resumes (``--trials`` counts the total). ``DIR/search.md`` ranks
the trials, ``search.csv`` holds them in full, ``best.yaml`` the best trial's options.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

from midol.errors import InputFileError, UsageError, message, raise_on_sigterm
from midol.tools import search_trial
from midol.tools.search_space import METHODS, Sweep, format_arg, grid_points, load_sweep, suggest
from midol.tools.search_trial import MetricMissing, TrialError, TrialRun, best_of

LOCK = ".midol-search.lock"
OWNED = ("--trainer.default_root_dir", "--run_id")  # the search gives each trial its folder


class _Failed(Exception):
    """Raised out of the objective so Optuna records the trial as failed and goes on."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midol search", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Options after -- go to every trial's midol fit, e.g. -- --trainer.max_epochs 10 "
               "--threads 1. W&B sweeps (wandb sweep / wandb agent) need a W&B account or a "
               "local W&B server (wandb server); midol search needs neither.")
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="a W&B sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("--config", action="append", default=None, metavar="PRESET",
                        help="midol fit preset(s), repeatable (default: the --config files of the "
                             "sweep file's command)")
    parser.add_argument("--trials", type=int, required=True, metavar="N",
                        help="total number of trials, finished ones of a resumed search included")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="search folder: search.db (the study), trials/<n>/, search.md, "
                             "search.csv, best.yaml")
    parser.add_argument("--study_name", default=None, metavar="NAME",
                        help="the study's name in DIR/search.db (default: the sweep file's name)")
    parser.add_argument("--sampler", choices=["tpe", "random", "grid"], default=None,
                        help="Optuna sampler (default: the sweep's method: bayes -> tpe, "
                             "random -> random, grid -> grid)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    parser.add_argument("--timeout_min", type=float, default=None, metavar="MIN",
                        help="start no trial after this many minutes (a running one finishes)")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The search's own options, and the fit options after ``--``."""
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return list(argv), []


def fit_argv(configs: list[str], extras: list[str], overrides: dict[str, Any],
             folder: Path) -> list[str]:
    return ["fit", *[t for c in configs for t in ("--config", c)], *extras,
            *[f"--{name}={format_arg(value)}" for name, value in overrides.items()],
            "--trainer.default_root_dir", str(folder)]


def _one_line(err: BaseException) -> str:
    text = message(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if isinstance(err, TrialError) else f"{type(err).__name__}: {line}"


def _lock(out: Path) -> int | None:
    """An exclusive lock on DIR for this search (two searches on one study would both take
    the trials they found running as left by a killed search): its file descriptor; the kernel
    releases it when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise UsageError(f"{out} is in use by another midol search (PID {owner}); wait for it to "
                         "end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _check_args(cfg: Any, sweep: Sweep, configs: list[str], extras: list[str]) -> None:
    if cfg.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {cfg.trials}")
    if cfg.timeout_min is not None and cfg.timeout_min <= 0:
        raise UsageError(f"--timeout_min must be > 0, got {cfg.timeout_min}")
    if not configs:
        raise UsageError(f"no fit preset: pass --config PRESET (the command of {sweep.path} names "
                         "no --config)")
    for config in configs:
        if not Path(config).is_file():
            raise InputFileError(f"--config {config}: no such file (run midol search from the folder "
                             "the preset paths start from, the repository root for configs/)")
    swept = {f"--{p.name}" for p in sweep.params}
    for token in extras:
        key = token.split("=", 1)[0]
        if key in OWNED or key in swept:
            what = ("each trial's folder is DIR/trials/<trial>" if key in OWNED
                    else "the sweep file searches it")
            raise UsageError(f"fit option {key} after --: {what}; leave it out")


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued


def _open_study(cfg: Any, sweep: Sweep, out: Path, fit: list[str], study_name: str) -> Any:
    """The study in DIR/search.db, created or resumed; trials a killed search left running are
    marked failed (without an error: 'interrupted', not counted)."""
    import optuna
    from optuna.trial import TrialState

    db = out / "search.db"
    trials = out / "trials"
    if not db.exists() and trials.is_dir() and any(trials.iterdir()):
        raise UsageError(f"{trials} holds an earlier search's trials but {db} is missing: choose "
                         "another --out")
    direction: Literal["maximize", "minimize"] = (
        "maximize" if sweep.goal == "maximize" else "minimize")
    study = optuna.create_study(storage=f"sqlite:///{db.resolve()}", study_name=study_name,
                                direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=cfg.seed))
    space = {p.name: repr(p) for p in sweep.params}
    wanted = {"metric": sweep.column, "goal": sweep.goal, "space": space}
    attrs = study.user_attrs
    if attrs:
        for key, value in wanted.items():
            if attrs.get(key) != value:
                was = "" if key == "space" else f" ({attrs.get(key)!r}, now {value!r})"
                raise UsageError(f"{db}: study {study_name!r} was run with another {key}{was}; "
                                 "resume it with the same sweep file, or choose another --out or "
                                 "--study_name")
        if attrs.get("fit") != fit:
            print(f"midol search: warning: resuming with another fit command than the study's "
                  f"earlier trials ({shlex.join(attrs.get('fit') or [])})", file=sys.stderr)
    for key, value in {**wanted, "fit": fit}.items():
        study.set_user_attr(key, value)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
    return study


def _progress(k: int, total: int, row: Any, metric: str) -> str:
    head = f"midol search: [{k}/{total}] trial {row.number}"
    took = "" if row.minutes is None else f" ({row.minutes:.1f} min)"
    if row.status == "complete":
        return (f"{head}: best {metric} {row.best:.4g} at epoch {row.epoch} (step {row.step}), "
                f"last {row.last:.4g}{took}")
    return f"{head}: {row.status}" + (f": {row.error}" if row.error else "") + took


def main(argv: list[str]) -> int:
    head, extras = split_argv(list(argv))
    cfg = build_parser().parse_args(head)
    from midol.run_guard import check_writable

    sweep = load_sweep(cfg.sweep)
    configs = cfg.config or sweep.configs
    _check_args(cfg, sweep, configs, extras)
    sampler = cfg.sampler or METHODS.get(sweep.method)
    if sampler is None:
        raise UsageError(f"{sweep.path}: method {sweep.method!r} is not bayes, random or grid; "
                         "pass --sampler tpe|random|grid")
    points = grid_points(sweep.params) if sampler == "grid" else None
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("midol search needs Optuna: pip install 'midol[search]' (or "
                         "pip install optuna)") from None
    out = Path(cfg.out)
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _search(cfg, sweep, configs, extras, sampler, points, out)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _search(cfg: Any, sweep: Sweep, configs: list[str], extras: list[str], sampler: str,
            points: list[dict[str, Any]] | None, out: Path) -> int:
    import optuna
    from optuna.trial import TrialState

    from midol.tools.search_report import (
        Info,
        cell,
        counted,
        others,
        rows_of,
        short_names,
        write_reports,
    )

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fit = ["midol", "fit", *[t for c in configs for t in ("--config", c)], *extras]
    name = cfg.study_name or Path(cfg.sweep).stem
    study = _open_study(cfg, sweep, out, fit, name)
    study.sampler = _sampler(sampler, cfg.seed + len(study.trials))  # a resume draws anew
    info = Info(study=name, sampler=sampler, seed=cfg.seed, fit=fit, out=str(out))
    total = min(cfg.trials, len(points)) if points is not None else cfg.trials
    short = short_names([p.name for p in sweep.swept])
    deadline = None if cfg.timeout_min is None else time.monotonic() + 60 * cfg.timeout_min

    def objective(trial: Any) -> float:
        overrides = suggest(sweep.params, trial)
        folder = out / "trials" / str(trial.number)
        args = fit_argv(configs, extras, overrides, folder)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("command", "midol " + shlex.join(args))
        shown = ", ".join(f"{short[p.name]}={cell(overrides[p.name])}" for p in sweep.swept)
        print(f"midol search: [{done + 1}/{total}] trial {trial.number}: {shown} "
              f"(log: {folder}/fit.log)", flush=True)
        try:
            run = TrialRun(trial.number, overrides, args, folder, sweep.column)
            history = search_trial.run_trial(run)
            best = best_of(history, sweep.goal)
        except Exception as err:
            trial.set_user_attr("error", _one_line(err))
            trial.set_user_attr("fatal", isinstance(err, MetricMissing))
            raise _Failed(str(err)) from err
        trial.set_user_attr("epoch", best.epoch)
        trial.set_user_attr("step", best.step)
        trial.set_user_attr("last", history[-1].value)
        trial.set_user_attr("validations", len(history))
        return best.value

    done = counted(rows_of(study.trials))
    notes: list[str] = []
    try:
        with raise_on_sigterm():  # SIGTERM stops the running fit too, as Ctrl-C does
            while done < total:
                if deadline is not None and time.monotonic() > deadline:
                    notes.append(f"--timeout_min {cfg.timeout_min:g} reached")
                    break
                if points is not None:
                    seen = {tuple(sorted(t.params.items())) for t in study.trials
                            if t.state.name == "COMPLETE" or t.user_attrs.get("error")}
                    todo = [p for p in points if tuple(sorted(p.items())) not in seen]
                    if not todo:
                        break
                    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                        study.enqueue_trial(todo[0])
                study.optimize(objective, n_trials=1, catch=(_Failed,))
                rows = rows_of(study.trials)
                done = counted(rows)
                last = max(rows, key=lambda r: r.number)
                print(_progress(done, total, last, sweep.column), flush=True)
                write_reports(out, rows, sweep, info)
                if study.trials[-1].user_attrs.get("fatal"):
                    raise UsageError(f"trial {last.number}: {last.error}")
    finally:
        rows = rows_of(study.trials)
        info.notes = notes
        written = write_reports(out, rows, sweep, info)
    complete = [r for r in rows if r.status == "complete"]
    if points is not None and cfg.trials > len(points) and done >= len(points):
        print(f"midol search: the grid has {len(points)} combination(s); all are done")
    print(f"midol search: {counted(rows)} trial(s) in {out}: {len(complete)} complete, "
          f"{sum(r.status == 'failed' for r in rows)} failed"
          + "".join(f", {n} {what} (not counted)" for n, what in others(rows))
          + "".join(f"; {n}" for n in notes))
    for what, path in written.items():
        print(f"  {what + ':':<7}{path}")
    print(f"  {'study:':<7}{out / 'search.db'} (the same command resumes; raise --trials for more)")
    return 0
