"""Evaluation of one pre-trained teacher for the ablation table: routing NMI/purity and the
k-means NMI of the teacher's features over the corpus (here), and the probes on labelled tasks,
which midol eval scores (:func:`probes`, through ``experiments/scoring.py``).

Images of the routing set are decoded and centre-cropped once (:class:`EvalSet`) and reused for
every row.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from midol.analysis.features import per_modality_indices
from midol.data import Corpus, EvalTransform
from midol.data.sources import DataSource
from midol.utils.cluster_metrics import routing_report

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import scoring  # noqa: E402


@dataclass
class EvalSet:
    """uint8 N x 3 x S x S images with integer labels and label names."""

    images: torch.Tensor
    labels: np.ndarray
    names: list[str]


def routing_set(sources: list[DataSource], size: int, per_modality: int, seed: int) -> EvalSet:
    """At most ``per_modality`` corpus images per modality (seeded), labelled by modality."""
    corpus = Corpus(sources)
    transform = EvalTransform(size)
    idx = per_modality_indices(corpus, per_modality, seed)
    images = [transform(corpus.load(i)) for i in tqdm(idx, desc="routing set", leave=False)]
    labels = np.array([corpus.modality(i) for i in idx])
    return EvalSet(torch.stack(images), labels, list(corpus.modalities))


@torch.no_grad()
def teacher_pass(module: Any, images: torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Pooled teacher features and the router's per-image top-1 expert."""
    module.eval()
    feats, experts = [], []
    for start in range(0, len(images), batch_size):
        f, routes = module.route(images[start:start + batch_size])
        experts.append(routes["projector"].expert if routes else torch.zeros(len(f), dtype=torch.long))
        feats.append(f.float())
    return torch.cat(feats).numpy(), torch.cat(experts).numpy()


def routing_metrics(module: Any, routing: EvalSet, seed: int) -> dict[str, Any]:
    """Routing report (per-image router top-1 vs modality) and the k-means NMI of the features
    (k = number of modalities, standardised features)."""
    feats, experts = teacher_pass(module, routing.images)
    counts = np.zeros((int(module.num_experts), len(routing.names)), dtype=np.int64)
    np.add.at(counts, (experts, routing.labels), 1)
    result: dict[str, Any] = {"routing": routing_report(counts, routing.names)}
    scaled = StandardScaler().fit_transform(feats)
    clusters = KMeans(len(routing.names), n_init=10, random_state=seed).fit_predict(scaled)
    result["kmeans_nmi"] = float(normalized_mutual_info_score(routing.labels, clusters))
    return result


def probes(checkpoint: str | os.PathLike[str], label: str, out: str | os.PathLike[str], seed: int,
           **kwargs: Any) -> dict[str, dict[str, Any]]:
    """midol eval of the checkpoint's teacher backbone (its first part) on the shared suite,
    held-out MedMNIST tasks apart from the corpus ones, against the random init of the same
    architecture at ``seed``: ``{"heldout": digest, "corpus": digest}`` (experiments/scoring.py),
    reports in ``out/heldout`` and ``out/corpus``."""
    return scoring.score_groups([(label, str(checkpoint))], out, reference_seed=seed, **kwargs)
