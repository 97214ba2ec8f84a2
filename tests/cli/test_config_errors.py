"""A misspelt config key or a wrong type is one `midol: error:` line with the closest valid key,
exit status 2, and no usage dump (issue 27, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from midol.cli import TOOLS, main
from midol.config_errors import short_parse_error

REPO = Path(__file__).resolve().parents[2]
DEMO = "configs/pretrain/demo.yaml"


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv, report=True)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    return err.rstrip("\n")


@pytest.mark.parametrize(("yaml_text", "extra", "expected"), [
    # a key misspelt in a config file
    ("model:\n  init_args:\n    num_expert: 3\n", [],
     "unknown option 'model.init_args.num_expert' — did you mean 'num_experts'?"),
    ("trainer:\n  max_epoch: 3\n", [],
     "unknown option 'trainer.max_epoch' — did you mean 'trainer.max_epochs'?"),
    ("data:\n  init_args:\n    transform:\n      init_args:\n        global_sise: 32\n", [],
     "unknown option 'data.init_args.transform.init_args.global_sise' — did you mean 'global_size'?"),
    # a wrong type or value in a config file
    ("model:\n  init_args:\n    cst_loss: mse\n", [],
     "model.init_args.cst_loss: expected one of 'infonce', 'dino_ce', got 'mse'"),
    # a key misspelt on the command line
    (None, ["--model.init_args.num_expert", "3"],
     "unknown option 'model.init_args.num_expert' — did you mean 'num_experts'?"),
    (None, ["--trainer.max_epocs", "3"],
     "unknown option 'trainer.max_epocs' — did you mean 'trainer.max_epochs'?"),
    (None, ["--trainer.max_epochs", "abc"], "trainer.max_epochs: expected int or None, got 'abc'"),
], ids=["yaml_model_key", "yaml_trainer_key", "yaml_nested_key", "yaml_choice", "cli_model_key",
        "cli_trainer_key", "cli_type"])
def test_config_and_command_line_typos_are_one_line_with_a_suggestion(
        tmp_path, monkeypatch, capsys, yaml_text, extra, expected):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MIDOL_DEBUG", raising=False)
    argv = ["fit", "--config", DEMO]
    if yaml_text is not None:
        (tmp_path / "typo.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "typo.yaml")]
    assert one_line_error(capsys, argv + extra) == f"midol: error: {expected}"


def test_misspelt_subcommand_suggests_it_and_lists_the_tools(monkeypatch, capsys):
    monkeypatch.delenv("MIDOL_DEBUG", raising=False)
    line = one_line_error(capsys, ["fitt", "--config", DEMO])
    assert line.startswith("midol: error: unknown subcommand 'fitt' — did you mean 'fit'? "
                           "(subcommands: fit, validate, test")
    assert "tools: " + ", ".join(sorted(TOOLS)) + ")" in line and "analyze, embed, eval, export" in line


def test_debug_adds_jsonargparse_message(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MIDOL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--debug", "fit", "--config", DEMO, "--model.init_args.num_expert", "3"], report=True)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "midol: error: unknown option 'model.init_args.num_expert' — did you mean 'num_experts'?"
    assert err[1] == "jsonargparse's message:" and "Option 'num_expert' is not accepted" in "\n".join(err)


def test_unknown_shapes_keep_their_text_on_one_line():
    assert short_parse_error("something odd\n  happened here") == "something odd; happened here"
    assert short_parse_error("unrecognized arguments: --nonsense_key 1", None) == \
        "unknown option 'nonsense_key'"
