"""Every `midol ...` command shown in README.md and docs/*.md still parses (issue 27: 5 of 31
documented commands had rotted). A `fit` / `validate` / `test` command whose config files exist
is parsed for real with --print_config (every option and value checked by LightningCLI, nothing
trained); any other command's options must be options of that command (its --help). Commands
with placeholders (CKPT, `...`) are checked by option name only."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from midol.cli import LIGHTNING_SUBCOMMANDS, TOOLS, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"^(?:OMP_NUM_THREADS=\d+\s+)?(?:\.venv/bin/)?midol\s+(.*)$")


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every `midol` line inside a fenced block (continuations joined, comments
    and `&&` chains split off)."""
    found = []
    for doc in DOCS:
        inside, pending = False, ""
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("```"):
                inside, pending = not inside, ""
                continue
            if not inside:
                continue
            text = (pending + " " + line.strip()).strip() if pending else line.strip()
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            text = re.sub(r"\s+#.*$", "", text)
            for part in re.split(r"&&|;", text):
                m = COMMAND.match(part.strip())
                if m:
                    try:
                        argv = shlex.split(m.group(1))
                    except ValueError:  # prose that starts with "midol" (an apostrophe)
                        continue
                    if argv and (argv[0] in TOOLS or argv[0] in LIGHTNING_SUBCOMMANDS):
                        found.append((doc.name, argv))
    return found


COMMANDS = documented_commands()


@cache
def help_text(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def options(argv: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in argv if t.startswith("--") and t != "--"][: None]


def runnable(argv: list[str]) -> bool:
    """A LightningCLI command whose files exist and that names no placeholder."""
    if argv[0] not in LIGHTNING_SUBCOMMANDS or "..." in argv:
        return False
    configs = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--config"]
    paths = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--ckpt_path"]
    return bool(configs) and all((REPO / c).is_file() for c in configs) and not paths


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 25  # the check cannot silently check nothing
    assert {argv[0] for _, argv in COMMANDS} >= {"fit", "test", "eval", "export", "predict", "route"}


@pytest.mark.parametrize("doc,argv", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in COMMANDS])
def test_a_documented_command_parses(doc: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    if runnable(argv) and "--print_config" not in argv and "--help" not in argv:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([*argv, "--print_config"])
        assert exit_.value.code in (0, None), f"{doc}: midol {' '.join(argv)}"
        return
    text = help_text(argv[0])
    own = [o for o in options(argv[1:]) if not o.startswith(("--model.", "--data.", "--trainer."))
           or argv[0] not in LIGHTNING_SUBCOMMANDS]
    def listed(option: str) -> bool:  # a whole option, not the start of a longer one
        return any(re.search(rf"(?<![\w.-]){re.escape(o)}(?![\w.-])", text)
                   for o in (option, option.replace("_", "-")))

    missing = [o for o in own if not listed(o)]
    assert missing == [], f"{doc}: `midol {' '.join(argv)}` uses options {argv[0]} does not have"


@pytest.mark.parametrize("argv", [
    ["eval", "--suite", "configs/eval/sample_data.yaml", "--backbone", "x"],  # --backbones
    ["fit", "--config", "configs/pretrain/demo.yaml", "--model.init_args.num_expertz", "3"],
])
def test_the_check_catches_a_rotted_command(argv: list[str], monkeypatch) -> None:
    with pytest.raises((AssertionError, SystemExit, ValueError)):
        test_a_documented_command_parses("planted", argv, monkeypatch)
