"""Which expert the teacher routes each image to: counts per expert x modality, and a table."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def routing_counts(
    module: Any,
    batches: Iterable[dict[str, Any]],
    num_modalities: int,
    progress: bool = True,
) -> torch.Tensor:
    """N x K image counts: rows are experts, columns modalities, from ``module.route_images``
    (the teacher router's top-1) over ``batches`` of ``{"image", "modality"}``."""
    was_training = module.training
    module.eval()
    counts = torch.zeros(module.num_experts, num_modalities, dtype=torch.long)
    for batch in tqdm(batches, desc="routing corpus", disable=not progress, leave=False):
        if batch["image"].shape[0] == 0:  # every file of this batch was unreadable
            continue
        images = batch["image"].to(module.device)
        expert, _ = module.route_images(images)
        flat = expert.cpu() * num_modalities + batch["modality"].cpu()
        counts += torch.bincount(flat, minlength=counts.numel()).view_as(counts)
    module.train(was_training)
    return counts


@torch.no_grad()
def route_features(
    module: Any, features: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 expert and its probability under ``softmax(g_T(f) / temperature)`` for pooled
    teacher features ``f`` (B x d); with ``temperature=1`` this is ``module.route_images`` on
    the images the features came from. No router (the no-MoE baseline): expert 0, probability 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    router = module.teacher["projector"].router
    if router is None:
        return (torch.zeros(features.shape[0], dtype=torch.long, device=features.device),
                torch.ones(features.shape[0], device=features.device))
    probs = (router(features).float() / temperature).softmax(dim=-1)
    confidence, expert = probs.max(dim=-1)
    return expert, confidence


def format_routing_table(counts: torch.Tensor, modalities: list[str]) -> str:
    """Markdown table, one row per expert, one column per modality, plus totals."""
    header = ["expert", *modalities, "total"]
    rows = [header, ["---"] * len(header)]
    for i, row in enumerate(counts.tolist()):
        rows.append([str(i), *map(str, row), str(sum(row))])
    rows.append(["total", *map(str, counts.sum(dim=0).tolist()), str(int(counts.sum()))])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
