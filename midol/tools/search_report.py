"""The outputs of ``midol search``: ``search.md`` (trials ranked on their best validation value,
best first), ``search.csv`` (the same rows, full values, errors and commands) and ``best.yaml``
(the best trial's overrides as a config fragment for ``midol fit --config``)."""

from __future__ import annotations

import csv
import io
import math
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from midol.io.atomic import atomic_write_text
from midol.tools.search_space import Sweep, fragment

OUTPUTS = ("search.md", "search.csv", "best.yaml")


@dataclass
class Row:
    number: int
    status: str  # complete, failed, interrupted, running
    overrides: dict[str, Any]
    error: str = ""
    best: float | None = None
    epoch: int | None = None
    step: int | None = None
    last: float | None = None
    validations: int | None = None
    minutes: float | None = None
    command: str = ""
    rank: int | None = None


@dataclass
class Info:
    """What the search ran, for the headers: study name, sampler, seed, the fit command's fixed
    part (``midol fit --config ...`` and the options after ``--``), the output folder."""

    study: str
    sampler: str
    seed: int
    fit: list[str]
    out: str
    notes: list[str] = field(default_factory=list)


def rows_of(trials: Iterable[Any]) -> list[Row]:
    """One row per Optuna trial (``FrozenTrial``); a failed trial without an error is one an
    interrupted search left (it does not count towards ``--trials``)."""
    rows = []
    for t in trials:
        state = t.state.name
        if state == "WAITING":
            continue
        attrs = t.user_attrs
        status = {"COMPLETE": "complete", "RUNNING": "running"}.get(
            state, "failed" if attrs.get("error") else "interrupted")
        minutes = None
        if t.datetime_start is not None and t.datetime_complete is not None:
            minutes = (t.datetime_complete - t.datetime_start).total_seconds() / 60
        rows.append(Row(number=t.number, status=status, overrides=dict(attrs.get("overrides") or {}),
                        error=str(attrs.get("error", "")),
                        best=t.value if status == "complete" else None,
                        epoch=attrs.get("epoch"), step=attrs.get("step"), last=attrs.get("last"),
                        validations=attrs.get("validations"), minutes=minutes,
                        command=str(attrs.get("command", ""))))
    return rows


def counted(rows: list[Row]) -> int:
    """Trials that count towards ``--trials``: complete or failed (not interrupted)."""
    return sum(r.status in ("complete", "failed") for r in rows)


def others(rows: list[Row]) -> list[tuple[int, str]]:
    """(count, status) of the rows that do not count: interrupted or still running."""
    found = [(sum(r.status == s for r in rows), s) for s in ("interrupted", "running")]
    return [(n, s) for n, s in found if n]


def ranked(rows: list[Row], goal: str) -> list[Row]:
    """Complete trials by their best value (best first; ties: the earlier trial), then the
    others by trial number; ``rank`` set on the complete ones."""
    sign = -1.0 if goal == "maximize" else 1.0
    done = sorted((r for r in rows if r.status == "complete" and r.best is not None),
                  key=lambda r: (sign * float(r.best or 0.0), r.number))
    for k, r in enumerate(done, 1):
        r.rank = k
    return done + sorted((r for r in rows if r not in done), key=lambda r: r.number)


def num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def cell(value: Any) -> str:
    text = num(value) if isinstance(value, (float, int)) and not isinstance(value, bool) else (
        yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        if isinstance(value, (dict, list)) else str(value).lower() if isinstance(value, bool)
        else "" if value is None else str(value))
    return text.replace("|", "\\|").replace("\n", " ")


def short_names(names: list[str]) -> dict[str, str]:
    """``model.init_args.lr`` -> ``lr`` where the short names stay unique."""
    short = {n: n.rsplit("init_args.", 1)[-1] for n in names}
    if len(set(short.values())) != len(short):
        return {n: n for n in names}
    return short


def markdown(rows: list[Row], sweep: Sweep, info: Info) -> str:
    names = [p.name for p in sweep.swept]
    short = short_names(names)
    metric = sweep.column
    failed = sum(r.status == "failed" for r in rows)
    complete = [r for r in rows if r.status == "complete"]
    lines = [f"# midol search: {info.study}", "",
             f"Sweep `{sweep.path}`; each trial: `{shlex.join(info.fit)} --<parameter>=<value>` "
             f"in `{info.out}/trials/<trial>/`.",
             f"Ranked on the best `{metric}` over each run's validations ({sweep.goal}), not the "
             f"last; sampler {info.sampler} (seed {info.seed}).",
             f"{counted(rows)} trial(s): {len(complete)} complete, {failed} failed"
             + "".join(f", {n} {what} (not counted)" for n, what in others(rows))
             + "".join(f"; {n}" for n in info.notes) + "."]
    if complete:
        top = complete[0]
        lines += ["", f"Best: trial {top.number}, {metric} {num(top.best)} at epoch "
                      f"{num(top.epoch)} (step {num(top.step)}); its overrides are in "
                      f"`{info.out}/best.yaml`: `{shlex.join(info.fit)} --config {info.out}/best.yaml`"]
    head = ["rank", "trial", *[short[n] for n in names], f"best {metric}", "epoch", "step",
            f"last {metric}", "minutes", "status"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = f"failed: {r.error}" if r.status == "failed" else r.status
        cells = [num(r.rank), str(r.number), *[cell(r.overrides.get(n)) for n in names],
                 num(r.best), num(r.epoch), num(r.step), num(r.last),
                 "" if r.minutes is None else f"{r.minutes:.1f}", cell(status)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row], sweep: Sweep) -> str:
    names = [p.name for p in sweep.swept]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "trial", *names, f"best {sweep.column}", "epoch", "step",
                     f"last {sweep.column}", "validations", "minutes", "status", "error", "command"])
    for r in rows:
        values = [yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (dict, list))
                  else v for v in (r.overrides.get(n) for n in names)]
        writer.writerow([r.rank or "", r.number, *["" if v is None else v for v in values],
                         "" if r.best is None else repr(r.best), _blank(r.epoch), _blank(r.step),
                         "" if r.last is None else repr(r.last), _blank(r.validations),
                         "" if r.minutes is None else f"{r.minutes:.2f}", r.status, r.error,
                         r.command])
    return buf.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


def best_yaml(top: Row, sweep: Sweep, info: Info) -> str:
    head = (f"# midol search {info.out} ({info.study}): the best of its trials, trial {top.number}: "
            f"{sweep.column} {num(top.best)} at epoch {num(top.epoch)} (step {num(top.step)}).\n"
            f"# Its swept options (sweep {sweep.path}) as a config fragment; rerun it with\n"
            f"#   {shlex.join(info.fit)} --config {info.out}/best.yaml\n")
    return head + yaml.safe_dump(fragment(top.overrides), sort_keys=False)


def write_reports(out: Path, rows: list[Row], sweep: Sweep, info: Info) -> dict[str, Path]:
    """Writes search.md, search.csv and (with a complete trial) best.yaml; returns them."""
    rows = ranked(rows, sweep.goal)
    written = {"table": atomic_write_text(out / "search.md", markdown(rows, sweep, info)),
               "csv": atomic_write_text(out / "search.csv", csv_text(rows, sweep))}
    if rows and rows[0].rank == 1:
        written["best"] = atomic_write_text(out / "best.yaml", best_yaml(rows[0], sweep, info))
    return written
