"""Which expert each router sends each image to: counts per expert x modality, and a table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from midol.methods.interfaces import Routed, has_routers


@torch.no_grad()
def routing_counts(
    module: Routed,
    batches: Iterable[dict[str, Any]],
    num_modalities: int,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per router of ``module``: an experts x modalities table of image counts of its per-image
    top-1 (``module.route``) over ``batches`` of ``{"image", "modality"}``. Empty for a model
    without a router."""
    if not has_routers(module):
        return {}
    was_training = getattr(module, "training", False)
    module.eval()  # type: ignore[attr-defined]
    device = next(module.parameters()).device  # type: ignore[attr-defined]
    counts = {name: torch.zeros(n, num_modalities, dtype=torch.long)
              for name, n in module.routers().items()}
    try:
        for batch in tqdm(batches, desc="routing corpus", disable=not progress, leave=False):
            if batch["image"].shape[0] == 0:  # every file of this batch was unreadable
                continue
            _, routes = module.route(batch["image"].to(device))
            modality = batch["modality"].cpu()
            for name, routing in routes.items():
                table = counts[name]
                flat = routing.expert.cpu() * num_modalities + modality
                table += torch.bincount(flat, minlength=table.numel()).view_as(table)
    finally:
        module.train(was_training)  # type: ignore[attr-defined]
    return counts


def format_routing_table(counts: torch.Tensor, modalities: list[str]) -> str:
    """Markdown table, one row per expert, one column per modality, plus totals."""
    header = ["expert", *modalities, "total"]
    rows = [header, ["---"] * len(header)]
    for i, row in enumerate(counts.tolist()):
        rows.append([str(i), *map(str, row), str(sum(row))])
    rows.append(["total", *map(str, counts.sum(dim=0).tolist()), str(int(counts.sum()))])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
