"""A bad config stops `midol fit --config` before any training, naming the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from midol.cli import main
from tests.helpers.faults import tiny_config


def _config_with(tmp_path: Path, section: str, **changes: Any) -> Path:
    """The tiny `midol fit` config with ``changes`` in ``<section>.init_args``."""
    path = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    config = yaml.safe_load(path.read_text())
    block = config["data"]["init_args"]["transform"] if section == "transform" else config[section]
    block["init_args"].update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("section", "changes", "expected"),
    [
        ("model", {"num_expertz": 3}, "num_expertz"),  # unknown key (a typo)
        ("model", {"num_experts": "three"}, "num_experts"),  # wrong type
        ("data", {"batch_size": 8.5}, "batch_size"),  # float for an int
        ("model", {"cst_loss": "mse"}, "cst_loss"),  # not one of the choices
    ],
    ids=["unknown_key", "wrong_type_str", "wrong_type_float", "bad_choice"],
)
def test_config_unknown_key_or_wrong_type_exits_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, changes: dict, expected: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(_config_with(tmp_path, section, **changes))])
    assert exc.value.code not in (0, None)
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("section", "changes", "expected"),
    [
        ("model", {"num_experts": 0}, "num_experts must be >= 1, got 0"),
        ("transform", {"num_global": 1, "num_local": 0}, "need at least 2 views"),
    ],
    ids=["num_experts_below_one", "fewer_than_two_views"],
)
def test_config_invalid_value_is_rejected_at_instantiation(
    tmp_path: Path, section: str, changes: dict, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        main(["fit", "--config", str(_config_with(tmp_path, section, **changes))])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_gpu_preset_on_a_machine_without_gpu_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27 item 6: the paper presets on a CPU-only machine ended in Lightning's traceback
    ("No supported gpu backend found!"), labelled a bug."""
    import torch

    from midol.errors import EXIT_USAGE, UsageError, exit_code, format_error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    with pytest.raises(UsageError) as err:
        main(["fit", "--config", "configs/pretrain/midol_swin_base.yaml",
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_code(err.value) == EXIT_USAGE
    assert format_error(err.value) == (
        "midol: error: trainer.accelerator is gpu (devices: auto, precision: bf16-mixed) but no "
        "CUDA GPU is visible: on this machine add --trainer.accelerator cpu --trainer.devices 1 "
        "--trainer.precision 32-true (and a smaller --data.init_args.batch_size; expect hours per "
        "epoch for a Swin-B)")
    assert not (tmp_path / "run").exists()
