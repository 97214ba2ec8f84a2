"""``midol export CKPT --out DIR``: the backbone(s) a pre-training checkpoint's method names as
worth keeping (M-IDoL: the teacher backbone) -> safetensors + JSON."""

from __future__ import annotations

import argparse

from midol.io.export import export_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="midol export",
        description="Export the backbone(s) of a pre-training checkpoint as safetensors plus a "
        "JSON (timm model name, overrides, image size, normalisation).",
    )
    parser.add_argument("checkpoint", help="a midol pre-training .ckpt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None, help="input size to record")
    parser.add_argument("--parts", nargs="+", default=None,
                        help="export names (default: the method's first, e.g. teacher_backbone; "
                        "M-IDoL also has student_backbone)")
    ns = parser.parse_args(argv)
    for path in export_checkpoint(ns.checkpoint, ns.out, ns.image_size, ns.parts):
        print(f"wrote {path}")
    return 0
