"""``midol export CKPT --out DIR``: the backbone(s) a pre-training checkpoint's method names as
worth keeping (M-IDoL: the teacher backbone) -> safetensors + JSON; for a MedMIX fusion
checkpoint, the deployable model (experts + fusion network, no teacher)."""

from __future__ import annotations

import argparse

from midol.tools.options import add_trust_option


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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing MedMIX export (backbone exports are always replaced)")
    add_trust_option(parser)
    ns = parser.parse_args(argv)
    from midol.methods.export import export_method  # after parsing: --help stays instant
    from midol.methods.loading import load_method

    method = load_method(ns.checkpoint, trusted_class_paths=tuple(ns.class_path))
    if hasattr(method, "deployable"):  # a fusion model: experts + fusion network, no teacher
        from midol.fusion.export import export_deployable

        print(f"wrote {export_deployable(method, ns.out, overwrite=ns.overwrite)}")
        return 0
    for path in export_method(method, ns.out, ns.parts, ns.image_size, str(ns.checkpoint)):
        print(f"wrote {path}")
    return 0
