"""The ``midol`` command: LightningCLI subcommands (fit, validate, test, predict) plus tools.

    midol fit --config configs/pretrain/demo.yaml [--model.init_args.num_experts 8 ...]
    midol fit --config configs/pretrain/demo.yaml --print_config
    midol export CKPT --out DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import lightning as L
from lightning.pytorch.cli import LightningCLI


class MidolCLI(LightningCLI):
    """LightningCLI in subclass mode: configs pick module and datamodule by ``class_path``,
    so users can select or add their own classes without touching midol."""


def run_lightning(args: list[str] | None = None, run: bool = True) -> MidolCLI:
    return MidolCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs={"description": "midol: medical image foundation models on Lightning"},
    )


def export_main(argv: list[str]) -> int:
    from midol.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="midol export",
        description="Export the teacher backbone of a pre-training checkpoint as safetensors.",
    )
    parser.add_argument("checkpoint", help="a midol pre-training .ckpt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None, help="input size to record")
    ns = parser.parse_args(argv)
    path = export_checkpoint(ns.checkpoint, ns.out, ns.image_size)
    print(f"wrote {path}")
    return 0


TOOLS: dict[str, Callable[[list[str]], int]] = {"export": export_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]](argv[1:])
    run_lightning(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
