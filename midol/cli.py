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

from midol.config_compose import expand_bases

# Subcommand -> module in midol.tools with ``main(argv) -> int``; imported only when used.
TOOLS: dict[str, str] = {"export": "midol.tools.cmd_export", "route": "midol.tools.cmd_route",
                         "analyze": "midol.tools.cmd_analyze", "shard": "midol.tools.cmd_shard",
                         "robustness": "midol.tools.cmd_robustness"}


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

    def before_instantiate_classes(self) -> None:
        """Fill checkpoint folders a preset left null from ``trainer.default_root_dir``
        (``<root>/checkpoints``), so a preset names its output folder once."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        fill_output_dirs(config.get("trainer"))


def fill_output_dirs(trainer: Any) -> None:
    """In a parsed ``trainer`` config: a null ``dirpath`` of a ModelCheckpoint becomes
    ``<default_root_dir>/checkpoints`` (Lightning's own default nests it under the logger)."""
    if trainer is None or not trainer.get("default_root_dir"):
        return
    root = str(trainer["default_root_dir"])
    callbacks = trainer.get("callbacks") or []
    for cb in callbacks:
        args = getattr(cb, "init_args", None)
        if args is not None and "ModelCheckpoint" in str(getattr(cb, "class_path", "")) \
                and args.get("dirpath") is None:
            args["dirpath"] = f"{root}/checkpoints"


def run_lightning(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> MidolCLI:
    """``args=None`` reads ``sys.argv``; tests pass a list or a parsed config dict (and
    ``run=False`` to only build). ``--config`` presets with ``base:`` are composed first."""
    return MidolCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args if isinstance(args, dict) else expand_bases(sys.argv[1:] if args is None else args),
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
