"""A W&B sweep file read for ``midol search``: its metric and goal, its method, the fit presets its
``command`` names, and its ``parameters`` as Optuna suggestions.

The parameter names are LightningCLI dotted options (``model.init_args.lr``), as W&B's agent
passes them (``${args}`` -> ``--model.init_args.lr=0.0003``), so one file serves both. Imports no
Optuna: :func:`suggest` takes any object with Optuna's ``suggest_*`` methods (a trial, a
``FixedTrial``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from midol.errors import InputFileError, UsageError

SUPPORTED = ("constant", "categorical", "uniform", "int_uniform", "q_uniform",
             "log_uniform_values", "log_uniform")
METHODS = {"bayes": "tpe", "random": "random", "grid": "grid"}  # W&B method -> sampler
GOALS = ("maximize", "minimize")
MAX_GRID = 100_000
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One swept option. ``kind``: constant, categorical, float or int; ``choices`` are the
    categorical values as written, ``encoded`` as Optuna stores them (a list or mapping as its
    JSON text); ``step``: q_uniform's q (values are multiples of it)."""

    name: str
    kind: str
    value: Any = None
    choices: tuple[Any, ...] = ()
    encoded: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None


@dataclass
class Sweep:
    path: str
    method: str
    metric: str  # as written: best/val/auc
    goal: str  # maximize | minimize
    params: list[Param]
    configs: list[str] = field(default_factory=list)  # the --config files of its command

    @property
    def column(self) -> str:
        """The metrics.csv column: the metric without W&B's ``best/`` prefix (midol's
        WandbLogger writes ``best/<metric>``; midol search takes the best of ``<metric>``)."""
        return self.metric.removeprefix("best/")

    @property
    def swept(self) -> list[Param]:
        return [p for p in self.params if p.kind != "constant"]


def _number(name: str, spec: dict[str, Any], key: str, dist: str) -> float:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"sweep parameter {name}: distribution {dist} needs a number {key}, "
                         f"got {value!r}")
    return value


def _infer(name: str, spec: dict[str, Any]) -> str:
    """W&B's default distribution: categorical for values, constant for value, int_uniform for
    integer min/max, else uniform."""
    if "values" in spec:
        return "categorical_w" if "probabilities" in spec else "categorical"
    if "value" in spec:
        return "constant"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise UsageError(f"sweep parameter {name}: give value, values, or distribution with min and "
                     f"max, got {spec!r}")


def parse_param(name: str, spec: Any) -> Param:
    """One entry of a sweep file's ``parameters``; an unsupported distribution is a
    :class:`UsageError` naming it."""
    if not isinstance(spec, dict):
        raise UsageError(f"sweep parameter {name}: expected a mapping such as {{values: [...]}} "
                         f"or {{distribution: uniform, min: 0, max: 1}}, got {spec!r}")
    if "parameters" in spec:
        raise UsageError(f"sweep parameter {name}: nested parameters are not supported by midol "
                         "search; name each option with its dotted path (model.init_args.lr)")
    dist = spec.get("distribution") or _infer(name, spec)
    if dist not in SUPPORTED:
        raise UsageError(f"sweep parameter {name}: distribution {dist!r} is not supported by midol "
                         f"search (supported: {', '.join(SUPPORTED)}); W&B sweeps still take it")
    if dist == "constant":
        if "value" not in spec:
            raise UsageError(f"sweep parameter {name}: distribution constant needs value")
        return Param(name, "constant", value=spec["value"])
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UsageError(f"sweep parameter {name}: values must be a non-empty list, got {values!r}")
        encoded = tuple(v if isinstance(v, _SCALARS) else json.dumps(v, sort_keys=True)
                        for v in values)
        if len(set(map(repr, encoded))) != len(encoded):
            raise UsageError(f"sweep parameter {name}: values repeat a value: {values!r}")
        return Param(name, "categorical", choices=tuple(values), encoded=encoded)
    low, high = _number(name, spec, "min", dist), _number(name, spec, "max", dist)
    if not low < high:
        raise UsageError(f"sweep parameter {name}: min must be below max, got {low} and {high}")
    if dist == "int_uniform":
        if not all(isinstance(v, int) for v in (low, high)):
            raise UsageError(f"sweep parameter {name}: int_uniform needs integer min and max, "
                             f"got {low} and {high}")
        return Param(name, "int", low=low, high=high)
    if dist == "uniform":
        return Param(name, "float", low=low, high=high)
    if dist == "log_uniform_values":
        if low <= 0:
            raise UsageError(f"sweep parameter {name}: log_uniform_values needs min > 0, got {low}")
        return Param(name, "float", low=low, high=high, log=True)
    if dist == "log_uniform":  # W&B: min and max are natural-log exponents
        return Param(name, "float", low=math.exp(low), high=math.exp(high), log=True)
    q = spec.get("q", 1)  # q_uniform: round(X / q) * q, X uniform in [min, max]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or q <= 0:
        raise UsageError(f"sweep parameter {name}: q_uniform needs q > 0, got {q!r}")
    first, last = math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9)
    if first > last:
        raise UsageError(f"sweep parameter {name}: no multiple of q={q} lies in [{low}, {high}]")
    if all(isinstance(v, int) for v in (low, high, q)):
        return Param(name, "int", low=first * q, high=last * q, step=q)
    return Param(name, "float", low=_clean(first * q, q), high=_clean(last * q, q), step=q)


def _clean(value: float, step: float) -> float:
    """A multiple of ``step`` without float noise (0.30000000000000004 -> 0.3)."""
    return float(f"{round(value / step) * step:.12g}")


def suggest(params: list[Param], trial: Any) -> dict[str, Any]:
    """Every parameter's value for ``trial`` (constants included), in the sweep file's order."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "constant":
            out[p.name] = p.value
        elif p.kind == "categorical":
            picked = trial.suggest_categorical(p.name, list(p.encoded))
            out[p.name] = p.choices[p.encoded.index(picked)]
        elif p.kind == "int":
            out[p.name] = int(trial.suggest_int(p.name, int(p.low), int(p.high),
                                                step=int(p.step or 1)))
        else:
            value = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            out[p.name] = _clean(value, p.step) if p.step else float(value)
    return out


def grid_points(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of the swept parameters, in the sweep file's order (the first
    parameter varies slowest), as Optuna's values (categorical: ``encoded``)."""
    axes: list[list[Any]] = []
    swept = [p for p in params if p.kind != "constant"]
    for p in swept:
        if p.kind == "categorical":
            axes.append(list(p.encoded))
        elif p.kind == "int":
            axes.append(list(range(int(p.low), int(p.high) + 1, int(p.step or 1))))
        elif p.step:
            count = round((p.high - p.low) / p.step) + 1
            axes.append([_clean(p.low + k * p.step, p.step) for k in range(count)])
        else:
            raise UsageError(f"--sampler grid: sweep parameter {p.name} is continuous; a grid needs "
                             "values, int_uniform or q_uniform (or use --sampler tpe|random)")
    total = math.prod(len(a) for a in axes)
    if total > MAX_GRID:
        raise UsageError(f"--sampler grid: {total} combinations (more than {MAX_GRID}); use "
                         "--sampler tpe or random")
    return [dict(zip([p.name for p in swept], combo)) for combo in itertools.product(*axes)]


def format_arg(value: Any) -> str:
    """A value as W&B's ``${args}`` writes it after ``--name=``: true/false, YAML flow style for
    lists and mappings, floats that YAML reads back as floats (3.0e-05, not 3e-05)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (dict, list, float)):
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        return text.removesuffix("...").strip()
    return str(value)


def fragment(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides as a nested config (``model.init_args.lr`` -> model: init_args: lr)."""
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        node = out
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def command_configs(command: Any) -> list[str]:
    """The ``--config`` values of a sweep file's ``command`` list."""
    tokens = [str(t).split("#", 1)[0].strip() for t in command] if isinstance(command, list) else []
    found = []
    for i, token in enumerate(tokens):
        if token in ("--config", "-c") and i + 1 < len(tokens):
            found.append(tokens[i + 1])
        elif token.startswith("--config="):
            found.append(token.split("=", 1)[1])
    return found


def load_sweep(path: str) -> Sweep:
    """A W&B sweep file, checked (one-line errors)."""
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"{path}: no such sweep file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise InputFileError(f"{path}: not a readable YAML sweep file{line}: "
                             f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a sweep file is a mapping with method, metric and parameters")
    metric = data.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        raise UsageError(f"{path}: the sweep file needs metric: {{name: best/val/auc, goal: "
                         "maximize}} (the validation metric to rank trials on)")
    goal = str(metric.get("goal", "minimize"))  # W&B's default goal
    if goal not in GOALS:
        raise UsageError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UsageError(f"{path}: the sweep file has no parameters to search")
    params = [parse_param(str(name), spec) for name, spec in parameters.items()]
    if not any(p.kind != "constant" for p in params):
        raise UsageError(f"{path}: every parameter is a constant; nothing to search")
    return Sweep(path=path, method=str(data.get("method", "")), metric=str(metric["name"]),
                 goal=goal, params=params, configs=command_configs(data.get("command")))
