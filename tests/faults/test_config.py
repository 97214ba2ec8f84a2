"""A bad config stops `midol fit --config` before any training, naming the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.faults import tiny_config
from midol.cli import main


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
