"""``midol export CKPT --out DIR``: the backbone(s) a pre-training checkpoint's method names as
worth keeping (M-IDoL: the teacher backbone) -> safetensors + JSON; for a MedMIX fusion
checkpoint, the deployable model (experts + fusion network, no teacher).

Beside each timm local-dir folder ``<part>_timm/`` it writes a model card ``README.md``
(:mod:`midol.methods.model_card`; ``--no_model_card`` skips it, ``--eval_report`` adds a
``midol eval`` report's verdicts).

``--onnx`` also writes ``<part>.onnx`` for each exported part, checked against PyTorch with
onnxruntime (:mod:`midol.methods.onnx_export`); for a fine-tuned task checkpoint (classification,
multi-label, segmentation) it writes the backbone + head as ``task_model.onnx`` with
``task_model.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from midol.errors import UsageError
from midol.tools.options import add_trust_option

TASK_PART = "task_model"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="midol export",
        description="Export the backbone(s) of a pre-training checkpoint as safetensors plus a "
        "JSON (timm model name, overrides, image size, normalisation).",
    )
    parser.add_argument("checkpoint", help="a midol pre-training .ckpt (with --onnx, also a "
                        "fine-tuned task .ckpt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None, help="input size to record")
    parser.add_argument("--parts", nargs="+", default=None,
                        help="export names (default: the method's first, e.g. teacher_backbone; "
                        "M-IDoL also has student_backbone)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing MedMIX export (backbone exports are always replaced)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write <part>.onnx (input: float32 normalised pixels, dynamic "
                        "batch axis), checked against PyTorch with onnxruntime (max abs "
                        "difference <= 1e-4, recorded in <part>.json); a fine-tuned task "
                        f"checkpoint: {TASK_PART}.onnx + {TASK_PART}.json. Needs "
                        "pip install 'midol[onnx]'")
    parser.add_argument("--no_model_card", action="store_true",
                        help="do not write the model card <part>_timm/README.md (architecture, "
                        "method and settings, corpus, training length, routing table, eval "
                        "verdicts, licence fields to fill, the one-line timm load)")
    parser.add_argument("--eval_report", default=None, metavar="PATH",
                        help="a `midol eval` report.md whose suite-level verdict table the model "
                        "card copies")
    add_trust_option(parser)
    ns = parser.parse_args(argv)
    if ns.eval_report is not None and not Path(ns.eval_report).is_file():
        raise UsageError(f"--eval_report {ns.eval_report}: no such file")
    from midol.methods.export import export_method  # after parsing: --help stays instant
    from midol.methods.loading import load_method
    from midol.methods.onnx_export import export_part_onnx, require_onnx

    if ns.onnx:
        require_onnx()  # before the checkpoint is read
    method = load_method(ns.checkpoint, trusted_class_paths=tuple(ns.class_path))
    if hasattr(method, "deployable"):  # a fusion model: experts + fusion network, no teacher
        if ns.onnx:
            raise UsageError(f"--onnx: {ns.checkpoint} is a MedMIX fusion checkpoint, whose "
                             "deployable model (several inputs, missing-input masks) has no ONNX "
                             "export; export it without --onnx")
        from midol.fusion.export import export_deployable

        print(f"wrote {export_deployable(method, ns.out, overwrite=ns.overwrite)}")
        return 0
    if not hasattr(method, "export_modules") and hasattr(method, "forward_normalized"):
        return export_task(method, ns)
    paths = export_method(method, ns.out, ns.parts, ns.image_size, str(ns.checkpoint))
    for path in paths:
        print(f"wrote {path}")
    if not ns.no_model_card:
        from midol.methods.model_card import write_model_card

        chosen_parts = ns.parts or [next(iter(method.export_modules()))]
        for name, path in zip(chosen_parts, paths):
            card = write_model_card(path, method, name, ns.checkpoint, ns.eval_report)
            if card is not None:
                print(f"wrote {card}")
    if ns.onnx:
        available = method.export_modules()
        chosen = ns.parts or [next(iter(available))]
        for name, path in zip(chosen, paths):
            parity = export_part_onnx(available[name].module, path, name)
            print(f"wrote {path.with_suffix('.onnx')} ({describe(parity)})")
    return 0


def export_task(model: Any, ns: argparse.Namespace) -> int:
    """``task_model.onnx`` + ``task_model.json`` of a fine-tuned task checkpoint (``--onnx``)."""
    import torch
    from torch import nn

    import midol
    from midol.data.transforms.common import IMAGENET_MEAN, IMAGENET_STD
    from midol.io.atomic import atomic_write_text
    from midol.methods.onnx_export import export_onnx, record_onnx

    class NormalizedTask(nn.Module):
        """The task model from normalised pixels to logits (its ``forward`` takes uint8)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.model.forward_normalized(x)
            return logits

    kind = type(model).__name__
    if not ns.onnx:
        raise UsageError(f"{ns.checkpoint} holds a fine-tuned {kind}, which has no pre-trained "
                         f"backbone parts to export; pass --onnx for its backbone + head as "
                         f"{TASK_PART}.onnx")
    if ns.parts:
        raise UsageError(f"--parts: {ns.checkpoint} holds a fine-tuned {kind}; its export is "
                         f"one part, {TASK_PART}")
    settings = model.task_settings()
    size = ns.image_size or settings.get("image_size") or 224
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": f"{type(model).__module__}.{type(model).__qualname__}",
        "prediction": settings.get("prediction"),
        "output_names": settings.get("output_names"),
        "image_size": int(size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "RGB scaled to [0, 1], then (x - mean) / std",
        "output": "logits (softmax or sigmoid per 'prediction' gives the probabilities)",
        "backbone": settings.get("backbone"),
        "source": str(ns.checkpoint),
        "midol_version": midol.__version__,
    }
    meta_path = out / f"{TASK_PART}.json"
    parity = export_onnx(NormalizedTask(), out / f"{TASK_PART}.onnx", int(size), TASK_PART,
                         output_name="logits")
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    record_onnx(meta_path, parity)
    print(f"wrote {out / parity.file} ({describe(parity)})")
    print(f"wrote {meta_path}")
    return 0


def describe(parity: Any) -> str:
    """One line on an ONNX export's parity check."""
    sizes = " and ".join(f"{s} px" for s in parity.sizes)
    batches = " and ".join(str(b) for b in parity.batch_sizes)
    return (f"max |ONNX - PyTorch| = {parity.max_abs_diff:.1e} at {sizes}, batch {batches}"
            + (f"; {parity.single_size_reason}" if parity.single_size_reason else ""))
