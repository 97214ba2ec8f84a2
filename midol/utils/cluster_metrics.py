"""Numbers that say how an image-to-expert routing relates to the modalities (plain numpy/torch).

``counts`` is always an N x K contingency table: rows are experts (clusters), columns are
modalities (classes), entries are image counts (``midol.analysis.routing_table.routing_counts``).
Entropies use natural logarithms; the normalised quantities do not depend on the base.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | list


def _table(counts: ArrayLike) -> np.ndarray:
    table = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"counts must be a 2-D experts x modalities table, got shape {table.shape}")
    if (table < 0).any() or not np.isfinite(table).all():
        raise ValueError("counts must be finite and >= 0")
    return table


def entropy(p: ArrayLike) -> float:
    """Shannon entropy (nats) of a non-negative vector, normalised to sum 1 first; 0 log 0 = 0
    (``scipy.stats.entropy``)."""
    from scipy.stats import entropy as scipy_entropy

    q = np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64).ravel()
    if (q < 0).any() or not np.isfinite(q).all():
        raise ValueError("entropy needs finite values >= 0")
    if q.sum() <= 0:
        raise ValueError("entropy of an all-zero vector is undefined")
    return float(scipy_entropy(q))


def normalized_entropy(p: ArrayLike) -> float:
    """``H(p) / log(len(p))`` in [0, 1]: 1 = uniform, 0 = all mass on one entry (1 if len 1)."""
    n = np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p).size
    return 1.0 if n <= 1 else entropy(p) / math.log(n)


def _nonempty(counts: ArrayLike) -> np.ndarray:
    table = _table(counts)
    if table.sum() <= 0:
        raise ValueError("counts is empty (no image)")
    return table


def mutual_information(counts: ArrayLike) -> float:
    """I(expert; modality) in nats of the joint distribution ``counts / counts.sum()``
    (scikit-learn's ``mutual_info_score`` on the contingency table)."""
    from sklearn.metrics import mutual_info_score

    return float(max(mutual_info_score(None, None, contingency=_nonempty(counts)), 0.0))


def normalized_mutual_info(counts: ArrayLike) -> float:
    """NMI = I(E; M) / ((H(E) + H(M)) / 2): scikit-learn's ``normalized_mutual_info_score``
    (arithmetic mean) of the (expert, modality) pair of every image the table counts, so its
    conventions hold: experts/modalities with no image are ignored, a single expert and a
    single modality agree (1), an MI of 0 gives 0. Equal to midol's former own code to 2e-15
    and 1-6 ms for up to 31,700 images (``experiments/results/library_choices_2026-12-08.md``)."""
    from sklearn.metrics import normalized_mutual_info_score

    table = _nonempty(counts)
    if not np.array_equal(table, np.round(table)):
        raise ValueError("counts must be whole numbers of images for the NMI")
    experts, modalities = np.nonzero(table)
    reps = table[experts, modalities].astype(np.int64)
    return float(normalized_mutual_info_score(np.repeat(modalities, reps), np.repeat(experts, reps)))


def purity(counts: ArrayLike) -> float:
    """Clustering purity: ``(1/n) sum_experts max_modality counts``, the share of images whose
    expert's majority modality is their own modality (1 = every expert holds one modality)."""
    table = _table(counts)
    n = table.sum()
    if n <= 0:
        raise ValueError("counts is empty (no image)")
    return float(table.max(axis=1).sum() / n)


def modality_coverage(counts: ArrayLike) -> float:
    """Inverse purity: ``(1/n) sum_modalities max_expert counts``, the share of images routed to
    their modality's majority expert (1 = no modality is split over several experts)."""
    return purity(_table(counts).T)


def routing_report(counts: ArrayLike, modalities: list[str] | None = None) -> dict[str, Any]:
    """Everything ``midol analyze`` and the routing monitor report about a routing table:
    per-expert load (share of images), its normalised entropy (1 = balanced), the number of
    experts used, the largest load, and, when there are >= 2 modalities, NMI and purity."""
    table = _table(counts)
    n = float(table.sum())
    if n <= 0:
        raise ValueError("counts is empty (no image)")
    load = table.sum(axis=1) / n
    report: dict[str, Any] = {
        "images": int(round(n)),
        "experts": int(table.shape[0]),
        "counts": table.astype(np.int64).tolist(),
        "expert_load": [float(x) for x in load],
        "load_entropy": normalized_entropy(load),
        "max_load": float(load.max()),
        "experts_used": int((table.sum(axis=1) > 0).sum()),
    }
    if modalities is not None:
        if len(modalities) != table.shape[1]:
            raise ValueError(f"{len(modalities)} modality names for a table with {table.shape[1]} columns")
        report["modalities"] = list(modalities)
    if table.shape[1] >= 2:
        report["nmi"] = normalized_mutual_info(table)
        report["purity"] = purity(table)
        report["modality_coverage"] = modality_coverage(table)
    return report


# ---------------------------------------------------------------------- per-batch (torch)
@torch.no_grad()
def distribution_stats(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse statistics of a batch of distributions (rows of ``probs``, B x K), as device
    scalars (no host sync):

    * ``entropy``: mean over rows of ``H(p_b) / log K`` (1 = every output uniform);
    * ``batch_entropy``: ``H(mean_b p_b) / log K`` (0 = all outputs on the same entry);
    * ``info``: ``(H(mean_b p_b) - mean_b H(p_b)) / log(min(K, B))``, the mutual information
      between image and output entry, normalised to [0, 1]. It goes to 0 in both DINO collapse
      modes (a constant sharp output and a uniform output).
    """
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] < 1:
        raise ValueError(f"probs must be B x K with K >= 2, got {tuple(probs.shape)}")
    p = probs.float()
    k, b = p.shape[1], p.shape[0]
    row_h = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
    mean_p = p.mean(dim=0)
    mean_h = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    info_norm = math.log(min(k, b)) if min(k, b) > 1 else 1.0
    return {
        "entropy": row_h.mean() / math.log(k),
        "batch_entropy": mean_h / math.log(k),
        "info": ((mean_h - row_h.mean()) / info_norm).clamp_min(0.0),
    }


@torch.no_grad()
def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different rows of ``x`` (B x D, B >= 2): close to 1 when
    every image gets the same representation (collapse to a constant)."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a B x D matrix with B >= 2, got {tuple(x.shape)}")
    z = torch.nn.functional.normalize(x.float(), dim=1)
    b = z.shape[0]
    s = z.sum(dim=0)
    # sum_{i != j} z_i . z_j = |sum_i z_i|^2 - sum_i |z_i|^2: O(B D), not O(B^2 D)
    return ((s @ s) - (z * z).sum()) / (b * (b - 1))
