"""End-of-training report: images seen, final losses, an expert x modality table per router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from midol.analysis.routing_table import format_routing_table, routing_counts
from midol.io.atomic import atomic_write_text


class PretrainSummary(L.Callback):
    """After ``fit``: route every image of the datamodule's corpus through the method's routers
    and print/write the expert x modality tables (``routing_table.md`` and ``summary.json`` in
    ``output_dir``, default the trainer's ``default_root_dir``). Needs a datamodule with
    ``routing_dataloader()`` and ``modalities``; a model without a router gets the numbers only.

    Args:
        output_dir: Folder of ``summary.json`` and ``routing_table.md``.
        progress: Show a progress bar while routing the corpus.
        max_images: route at most this many images, evenly spaced over the corpus (a large
            corpus; null: all). The table then says how many it counts.
    """

    def __init__(self, output_dir: str | None = None, progress: bool = True,
                 max_images: int | None = None):
        if max_images is not None and max_images < 1:
            raise ValueError(f"PretrainSummary max_images must be >= 1 or null, got {max_images}")
        self.output_dir = output_dir
        self.progress = progress
        self.max_images = max_images

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "routing_dataloader"):
            raise ValueError("PretrainSummary needs a datamodule with routing_dataloader()")
        modalities = list(datamodule.modalities)
        loader = (datamodule.routing_dataloader() if self.max_images is None
                  else datamodule.routing_dataloader(max_images=self.max_images))
        counts = routing_counts(pl_module, loader, len(modalities), self.progress)  # type: ignore[arg-type]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        keys = getattr(pl_module, "summary_metrics", lambda: [])()
        finals: dict[str, Any] = {f"final_{k.split('/')[-1]}": metrics.get(k) for k in keys}
        summary: dict[str, Any] = {
            "images_seen": int(getattr(pl_module, "images_seen", 0)),
            "global_step": trainer.global_step,
            **finals,
            "modalities": modalities,
        }
        if len(counts) == 1:
            summary["routing_counts"] = next(iter(counts.values())).tolist()
        elif counts:
            summary["routing_counts"] = {name: c.tolist() for name, c in counts.items()}
        tables = [(name, format_routing_table(c, modalities)) for name, c in counts.items()]
        text = "\n\n".join(table if len(tables) == 1 else f"router {name}:\n\n{table}"
                           for name, table in tables)
        out = Path(self.output_dir or trainer.default_root_dir)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if tables:
            atomic_write_text(out / "routing_table.md", text + "\n")

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        losses = "   ".join(f"final {k.split('/')[-1].replace('l_', 'L_')}: {fmt(metrics.get(k))}"
                           for k in keys)
        routing = (f"routing over the corpus (image counts, rows = experts):\n{text}\n"
                   if tables else "no router (the model has a single expert)\n")
        rank_zero_info(
            "\n== midol pre-training summary ==\n"
            f"images seen: {summary['images_seen']} ({trainer.global_step} optimiser steps)\n"
            f"{losses}\n{routing}written to {out}/"
        )
