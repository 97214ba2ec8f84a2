"""``midol export CKPT --out DIR``: teacher backbone of a pre-training checkpoint -> safetensors."""

from __future__ import annotations

import argparse

from midol.export import export_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="midol export",
        description="Export the teacher backbone of a pre-training checkpoint as safetensors "
        "plus a JSON (timm model name, overrides, image size, normalisation).",
    )
    parser.add_argument("checkpoint", help="a midol pre-training .ckpt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None, help="input size to record")
    ns = parser.parse_args(argv)
    path = export_checkpoint(ns.checkpoint, ns.out, ns.image_size)
    print(f"wrote {path}")
    return 0
