"""One pass of the teacher over a corpus: pooled features, top-1 expert, confidence, modality."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from midol.data.pretrain import Corpus, RoutingCollate, RoutingDataset
from midol.data.transforms import EvalTransform
from midol.routing import route_features


@dataclass
class RoutedImages:
    """Per-image results in corpus order; ``modality`` indexes ``modalities``."""

    paths: list[str]
    index: np.ndarray
    modality: np.ndarray
    expert: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None
    modalities: list[str]
    num_experts: int
    skipped: list[str] = field(default_factory=list)

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
    module: Any,
    batches: Iterable[dict[str, Any]],
    modalities: list[str],
    temperature: float = 1.0,
    keep_features: bool = True,
    progress: bool = True,
    desc: str = "teacher pass",
) -> RoutedImages:
    """Run the teacher backbone and router of a :class:`~midol.methods.PretrainModule` over
    ``batches``; one backbone forward per batch serves features and routing."""
    was_training = module.training
    module.eval()
    paths: list[str] = []
    indices: list[torch.Tensor] = []
    mods: list[torch.Tensor] = []
    experts: list[torch.Tensor] = []
    confidences: list[torch.Tensor] = []
    feats: list[torch.Tensor] = []
    skipped: list[str] = []
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
            skipped.extend(batch.get("skipped", ()))
            if batch["image"].shape[0] == 0:
                continue
            f = module.teacher_features(batch["image"].to(module.device))
            expert, confidence = route_features(module, f, temperature)
            paths.extend(batch["path"])
            indices.append(batch["index"].cpu())
            mods.append(batch["modality"].cpu())
            experts.append(expert.cpu())
            confidences.append(confidence.cpu())
            if keep_features:
                feats.append(f.float().cpu())
    finally:
        module.train(was_training)
    if not paths:
        raise ValueError("no readable image: " + "; ".join(skipped[:5]))
    return RoutedImages(
        paths=paths,
        index=torch.cat(indices).numpy(),
        modality=torch.cat(mods).numpy(),
        expert=torch.cat(experts).numpy(),
        confidence=torch.cat(confidences).numpy(),
        features=torch.cat(feats).numpy() if keep_features else None,
        modalities=list(modalities),
        num_experts=int(module.num_experts),
        skipped=skipped,
    )
