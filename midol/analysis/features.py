"""One pass of a trained method over a corpus: pooled features, each router's top-1 expert and
confidence, and the modality of every image."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from midol.data.corpus import Corpus
from midol.data.pretrain_datasets import RoutingCollate, RoutingDataset
from midol.data.transforms.eval import EvalTransform
from midol.methods.interfaces import Routed, has_routers


@dataclass
class RoutedImages:
    """Per-image results in corpus order; ``modality`` indexes ``modalities``. ``expert`` and
    ``confidence`` are those of the first router (all experts 0 for a model without one);
    ``routes`` holds every router's experts by name."""

    paths: list[str]
    index: np.ndarray
    modality: np.ndarray
    expert: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None
    modalities: list[str]
    num_experts: int
    skipped: list[str] = field(default_factory=list)
    routes: dict[str, np.ndarray] = field(default_factory=dict)
    router_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def has_router(self) -> bool:
        return bool(self.routes)

    def counts_of(self, router: str) -> np.ndarray:
        """Experts x modalities image counts of ``router``."""
        table = np.zeros((self.router_sizes[router], len(self.modalities)), dtype=np.int64)
        np.add.at(table, (self.routes[router], self.modality), 1)
        return table

    def counts(self) -> np.ndarray:
        """Experts x modalities image counts."""
        table = np.zeros((self.num_experts, len(self.modalities)), dtype=np.int64)
        np.add.at(table, (self.expert, self.modality), 1)
        return table


def per_modality_indices(corpus: Corpus, per_modality: int | None, seed: int = 0) -> list[int]:
    """Corpus indices with at most ``per_modality`` items of each modality (a seeded random
    choice, returned sorted), or every index when ``per_modality`` is None."""
    if per_modality is None:
        return list(range(len(corpus)))
    if per_modality < 1:
        raise ValueError(f"per_modality must be >= 1, got {per_modality}")
    rng = np.random.default_rng(seed)
    modality = np.array([corpus.modality(i) for i in range(len(corpus))])
    chosen: list[np.ndarray] = []
    for k in range(len(corpus.modalities)):
        idx = np.flatnonzero(modality == k)
        if len(idx) > per_modality:
            idx = rng.choice(idx, per_modality, replace=False)
        chosen.append(idx)
    return sorted(int(i) for i in np.concatenate(chosen))


def routing_loader(
    corpus: Corpus,
    image_size: int,
    indices: list[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> DataLoader[dict[str, Any]]:
    """Centre crops of the corpus items ``indices`` (default all), in order, as
    ``{"image", "modality", "index", "path", "skipped"}`` batches (unreadable files dropped)."""
    dataset: Any = RoutingDataset(corpus, EvalTransform(image_size))
    if indices is not None:
        dataset = Subset(dataset, indices)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=RoutingCollate(image_size),
    )


@torch.no_grad()
def collect(
    module: Routed,
    batches: Iterable[dict[str, Any]],
    modalities: list[str],
    temperature: float | None = None,
    keep_features: bool = True,
    progress: bool = True,
    desc: str = "teacher pass",
) -> RoutedImages:
    """Run ``module.route`` (features and every router's routing in one forward) over
    ``batches``; ``temperature`` scales the confidences (None: the method's own)."""
    was_training = getattr(module, "training", False)
    module.eval()  # type: ignore[attr-defined]
    device = next(module.parameters()).device  # type: ignore[attr-defined]
    sizes = module.routers() if has_routers(module) else {}
    paths: list[str] = []
    indices: list[torch.Tensor] = []
    mods: list[torch.Tensor] = []
    routes: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    confidences: list[torch.Tensor] = []
    feats: list[torch.Tensor] = []
    skipped: list[str] = []
    total = len(batches) if isinstance(batches, Sized) else None
    try:
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
            skipped.extend(batch.get("skipped", ()))
            if batch["image"].shape[0] == 0:
                continue
            images = batch["image"].to(device)
            if sizes:
                f, routed = module.route(images, temperature)
                for name in sizes:
                    routes[name].append(routed[name].expert.cpu())
                confidences.append(next(iter(routed.values())).confidence.cpu())
            else:
                f = module.embed(images)  # type: ignore[attr-defined]
                confidences.append(torch.ones(images.shape[0]))
            paths.extend(batch["path"])
            indices.append(batch["index"].cpu())
            mods.append(batch["modality"].cpu())
            if keep_features:
                feats.append(f.float().cpu())
    finally:
        module.train(was_training)  # type: ignore[attr-defined]
    if not paths:
        raise ValueError("no readable image: " + "; ".join(skipped[:5]))
    route_arrays = {name: torch.cat(parts).numpy() for name, parts in routes.items()}
    first = next(iter(route_arrays), None)
    return RoutedImages(
        paths=paths,
        index=torch.cat(indices).numpy(),
        modality=torch.cat(mods).numpy(),
        expert=route_arrays[first] if first else np.zeros(len(paths), dtype=np.int64),
        confidence=torch.cat(confidences).numpy(),
        features=torch.cat(feats).numpy() if keep_features else None,
        modalities=list(modalities),
        num_experts=int(sizes[first]) if first else 1,
        skipped=skipped,
        routes=route_arrays,
        router_sizes=dict(sizes),
    )
