"""MedMIX option errors name the option (issue 26 item 16): a train_drop_input that is no input
failed mid-training with "'x' is not in list", a transformer width not divisible by its heads with
an AssertionError (reported as a bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from midol.errors import EXIT_USAGE, exit_code
from midol.models.fusion import InputFusion
from tests.helpers.medmix import ODIR, datamodule, medmix, odir_subset


def test_transformer_width_is_checked_with_the_option_name() -> None:
    with pytest.raises(ValueError, match="dim must be a multiple of 4 with fusion: transformer") as err:
        medmix(Path("unused"), fusion="transformer", dim=10)
    assert exit_code(err.value) == EXIT_USAGE
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        InputFusion(2, 10, "transformer")


@pytest.mark.skipif(not (ODIR / "patients.csv").is_file(), reason="ODIR patients not found")
def test_an_unknown_train_drop_input_is_named_at_setup(tmp_path: Path) -> None:
    model = medmix(tmp_path / "cache", train_drop_input="left_eye")
    with pytest.raises(ValueError, match=r"train_drop_input: 'left_eye' is not an input of the data "
                                         r"\(inputs: left_fundus, right_fundus, demographics\)"):
        model.attach(datamodule(odir_subset(tmp_path)), fit=True)
