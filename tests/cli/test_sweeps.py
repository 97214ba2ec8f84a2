"""W&B sweep files: sample one parameter set from each, build the agent's command line the way
W&B does (``${env} midol fit ... ${args}``) and check LightningCLI parses and instantiates it with
the sampled values (run=False)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from midol.cli import run_lightning
from midol.loggers import WandbLogger
from tests.helpers.finetune import REPO, pretrain_checkpoint

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B parameter spec (the distributions the sweep files use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    dist = spec.get("distribution", "uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    raise ValueError(f"sampler does not know distribution {dist!r}")


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The argv W&B's agent runs: ``${args}`` becomes ``--key=value`` (JSON for dicts/lists)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (dict, list)):
            return yaml.safe_dump(v, default_flow_style=True).strip()
        return str(v)

    argv: list[str] = []
    for token in sweep["command"]:
        if token in ("${env}", "${interpreter}"):
            continue
        if token == "${program}":
            argv.append(sweep["program"])
        elif token == "${args}":
            argv += [f"--{k}={fmt(v)}" for k, v in params.items()]
        else:
            argv.append(token)
    return argv


def test_sweep_files_exist():
    assert len(SWEEPS) >= 3


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sampled_sweep_command_parses(path: Path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    params = {k: sample(v, random.Random(path.name)) for k, v in sweep["parameters"].items()}
    argv = agent_command(sweep, params)
    assert argv[:2] == ["midol", "fit"], argv
    # The shipped configs load outputs/demo's checkpoint; tests use a tiny one made here.
    ckpt = pretrain_checkpoint(tmp_path_factory)
    cli = run_lightning([*argv[2:], f"--model.init_args.init_checkpoint={ckpt}",
                         "--trainer.accelerator=cpu"], run=False)
    assert isinstance(cli.trainer.logger, WandbLogger)
    monitor = cli.trainer.checkpoint_callback.monitor
    # the sweep ranks on the best epoch's value of what the checkpoint keeps (WandbLogger's best/)
    assert sweep["metric"]["name"] == f"best/{monitor}", "the sweep must optimise what the checkpoint keeps"
    assert cli.trainer.logger._best.direction(monitor) == ("max" if sweep["metric"]["goal"] == "maximize" else "min")
    for key, value in params.items():
        section, _, name = key.partition(".init_args.")
        if section == "model":
            got = cli.model.hparams[name]
        elif key == "seed_everything":
            got = cli.config["seed_everything"]
        else:
            got = cli.config[section]["init_args"][name]
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key
