"""End-of-training report: images seen, final losses, the expert x modality routing table."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from midol.routing import format_routing_table, routing_counts


class PretrainSummary(L.Callback):
    """After ``fit``: route every image of the datamodule's corpus through the teacher and
    print/write the expert x modality table (``routing_table.md`` and ``summary.json`` in
    ``output_dir``, default the trainer's ``default_root_dir``). Needs a datamodule with
    ``routing_dataloader()`` and ``modalities``."""

    def __init__(self, output_dir: str | None = None, progress: bool = True):
        self.output_dir = output_dir
        self.progress = progress

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "routing_dataloader"):
            raise ValueError("PretrainSummary needs a datamodule with routing_dataloader()")
        counts = routing_counts(
            pl_module, datamodule.routing_dataloader(), len(datamodule.modalities), self.progress
        )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        summary = {
            "images_seen": int(pl_module.images_seen),
            "global_step": trainer.global_step,
            "final_l_route": metrics.get("train/l_route"),
            "final_l_cst": metrics.get("train/l_cst"),
            "modalities": list(datamodule.modalities),
            "routing_counts": counts.tolist(),
        }
        table = format_routing_table(counts, list(datamodule.modalities))
        out = Path(self.output_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "routing_table.md").write_text(table + "\n")

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        rank_zero_info(
            "\n== midol pre-training summary ==\n"
            f"images seen: {summary['images_seen']} ({trainer.global_step} optimiser steps)\n"
            f"final L_route: {fmt(summary['final_l_route'])}   final L_cst: {fmt(summary['final_l_cst'])}\n"
            "teacher routing over the corpus (image counts, rows = experts):\n"
            f"{table}\n"
            f"written to {out}/"
        )
