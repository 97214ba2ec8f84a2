"""The ``midol`` command: LightningCLI subcommands (fit, validate, test) plus tools (predict,
export, route, analyze, ...).

    midol fit --config configs/pretrain/demo.yaml [--model.init_args.num_experts 8 ...]
    midol fit --config configs/pretrain/demo.yaml --print_config
    midol export CKPT --out DIR
    midol predict CKPT --images FOLDER_OR_CSV --out preds.csv

This module only dispatches, and imports neither torch nor Lightning: ``midol --version`` and
``midol --help`` answer in a fraction of a second. The LightningCLI subcommands live in
:mod:`midol.lightning_cli` and the tools in :mod:`midol.tools`, each imported when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from midol.commands import TOOLS
from midol.console import quiet_known_noise, version_line
from midol.errors import debug_requested, run_reporting

if TYPE_CHECKING:
    from midol.lightning_cli import MidolCLI

# LightningCLI's subcommands, for the top-level help (the parser itself is built only when one runs)
LIGHTNING_SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (pre-training or fine-tuning) from --config presets",
    "validate": "one evaluation pass over the validation split",
    "test": "one evaluation pass over the test split",
}  # Lightning's "predict" is replaced by the tool (midol/tools/cmd_predict.py)

# Names of the LightningCLI part that were importable from midol.cli (midol <= 0.1.0).
_LIGHTNING_NAMES = frozenset({
    "MidolCLI", "LoggedSaveConfig", "apply_threads", "config_files_root", "fill_output_dirs",
    "resolve_run_id", "weights_mismatch_message", "with_atomic_checkpoint_io",
})


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        return getattr(importlib.import_module("midol.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_lightning(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> MidolCLI:
    """:func:`midol.lightning_cli.run_lightning`: ``args=None`` reads ``sys.argv``; tests pass a
    list or a parsed config dict (and ``run=False`` to only build)."""
    from midol.lightning_cli import run_lightning as run_cli

    return run_cli(args, run)


def top_level_help() -> str:
    """``midol --help``, without building LightningCLI's parser (that imports every library)."""
    width = max(len(n) for n in [*LIGHTNING_SUBCOMMANDS, *TOOLS]) + 2
    lines = [
        f"usage: midol [--debug] {{{','.join(LIGHTNING_SUBCOMMANDS)}}} [-c CONFIG] [options]",
        "       midol <tool> [options]",
        "       midol --version",
        "",
        "midol: medical image foundation models on Lightning.",
        "",
        "subcommands (midol <subcommand> --help lists every option of a config):",
        *(f"  {name:<{width}}{text}" for name, text in LIGHTNING_SUBCOMMANDS.items()),
        "",
        f"tools (midol <tool> --help): {', '.join(sorted(TOOLS))}",
        "",
        "options:",
        "  -h, --help    show this help message and exit",
        "  -V, --version print the versions of midol, torch, lightning and timm",
        "  --debug       show the traceback behind an error message (or MIDOL_DEBUG=1)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, report: bool | None = None) -> int:
    """The ``midol`` command. ``report`` (default: when ``argv`` is None, i.e. the console
    command) turns an error into one ``midol: error: ...`` line on stderr and an exit status
    per kind of error (:mod:`midol.errors`; the traceback only for unexpected errors, or with
    ``--debug`` / ``MIDOL_DEBUG=1``); callers passing ``argv`` get the exception itself."""
    debug, tokens = debug_requested(sys.argv[1:] if argv is None else list(argv))
    if tokens[:1] in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if tokens in (["--help"], ["-h"]):
        print(top_level_help())
        return 0
    quiet_known_noise()

    def run() -> int:
        if tokens and tokens[0] in TOOLS:
            return int(importlib.import_module(TOOLS[tokens[0]]).main(tokens[1:]))
        run_lightning(tokens)
        return 0

    if not (argv is None if report is None else report):
        return run()
    return run_reporting(run, debug)


if __name__ == "__main__":
    sys.exit(main())
