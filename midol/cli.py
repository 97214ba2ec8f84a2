"""The ``midol`` command: LightningCLI subcommands (fit, validate, test, predict) plus tools.

    midol fit --config configs/pretrain/demo.yaml [--model.init_args.num_experts 8 ...]
    midol fit --config configs/pretrain/demo.yaml --print_config
    midol export CKPT --out DIR
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

# Subcommand -> module in midol.tools with ``main(argv) -> int``; imported only when used.
TOOLS: dict[str, str] = {"export": "midol.tools.export", "route": "midol.tools.route",
                         "analyze": "midol.tools.analyze", "shard": "midol.tools.shard"}


class MidolCLI(LightningCLI):
    """LightningCLI in subclass mode: configs pick module and datamodule by ``class_path``,
    so users can select or add their own classes without touching midol.

    ``--ckpt_path`` checkpoints are read with ``weights_only=True`` by default (no pickled code
    runs); pass ``--weights_only false`` only for a checkpoint you trust.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)
        return parser


def run_lightning(args: list[str] | None = None, run: bool = True) -> MidolCLI:
    """``args=None`` reads ``sys.argv``; tests pass a list (and ``run=False`` to only build)."""
    return MidolCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs={"description": "midol: medical image foundation models on Lightning. "
                       f"Other subcommands: {', '.join(sorted(TOOLS))} (midol <tool> --help)."},
    )


def main(argv: list[str] | None = None) -> int:
    tokens = sys.argv[1:] if argv is None else argv
    if tokens and tokens[0] in TOOLS:
        return importlib.import_module(TOOLS[tokens[0]]).main(tokens[1:])
    run_lightning(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
