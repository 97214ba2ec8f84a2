"""Evaluation of one pre-trained teacher for the ablation table: routing NMI/purity over the
corpus and a logistic-regression linear probe on frozen teacher features.

Images are decoded and centre-cropped once (:class:`EvalSet`) and reused for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from midol.analysis.features import per_modality_indices
from midol.analysis.cluster_metrics import routing_report
from midol.data import Corpus, EvalTransform, is_image_file, load_image
from midol.data.sources import DataSource

# Labelled sets of ../shared/data for the probe: class-per-folder trees (one per modality that
# has enough images per class for 5-fold cross-validation).
PROBES: dict[str, str] = {
    "isic9 (dermoscopy)": "dermoscopy/isic_9class_180px",
    "odir6 (fundus)": "fundus/odir_disease_eye",
    "kermany2 (x-ray)": "chest_xray/kermany_pneumonia_testsplit_224",
}

# Labelled sets that are NOT in the pre-training corpus of experiments/ablations/shared_data.yaml
# (MedMNIST v2 test splits, 28 px, upsampled): the probe that no row was tuned on.
HELDOUT_PROBES: dict[str, str] = {
    "pneumoniamnist (x-ray, held out)": "medmnist/pneumoniamnist.npz",
    "retinamnist (fundus, held out)": "medmnist/retinamnist.npz",
}


@dataclass
class EvalSet:
    """uint8 N x 3 x S x S images with integer labels and label names."""

    images: torch.Tensor
    labels: np.ndarray
    names: list[str]


def folder_classes(root: Path, size: int) -> EvalSet:
    """A class-per-folder tree, decoded and centre-cropped to ``size``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    transform = EvalTransform(size)
    images, labels = [], []
    for k, name in enumerate(classes):
        for path in sorted(p for p in (root / name).rglob("*") if is_image_file(p.name)):
            images.append(transform(load_image(path)))
            labels.append(k)
    return EvalSet(torch.stack(images), np.array(labels), classes)


def npz_classes(path: Path, size: int, split: str = "test") -> EvalSet:
    """A MedMNIST ``.npz`` split (``<split>_images``, ``<split>_labels``), resized to ``size``."""
    data = np.load(path)
    raw, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    transform = EvalTransform(size)
    images = [transform(np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im) for im in raw]
    return EvalSet(torch.stack(images), labels.astype(np.int64),
                   [str(k) for k in sorted(set(labels.tolist()))])


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


def linear_probe(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> tuple[float, float]:
    """Mean and std of the accuracy of a standardised multinomial logistic regression (L2,
    C = 1, lbfgs) over stratified ``folds``-fold cross-validation."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, features, labels, cv=cv, scoring="accuracy")
    return float(scores.mean()), float(scores.std())


def probe_auc(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> float:
    """Macro one-vs-rest ROC AUC of the same probe, from out-of-fold probabilities."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, features, labels, cv=cv, method="predict_proba")
    if proba.shape[1] == 2:
        return float(roc_auc_score(labels, proba[:, 1]))
    return float(roc_auc_score(labels, proba, multi_class="ovr", average="macro"))


def evaluate(module: Any, routing: EvalSet, probes: dict[str, EvalSet], seed: int,
             heldout: dict[str, EvalSet] | None = None) -> dict[str, Any]:
    """Routing report (per-image router top-1 vs modality), k-means NMI of the features
    (k = number of modalities) and the probe accuracies."""
    feats, experts = teacher_pass(module, routing.images)
    counts = np.zeros((int(module.num_experts), len(routing.names)), dtype=np.int64)
    np.add.at(counts, (experts, routing.labels), 1)
    result: dict[str, Any] = {"routing": routing_report(counts, routing.names)}
    scaled = StandardScaler().fit_transform(feats)
    clusters = KMeans(len(routing.names), n_init=10, random_state=seed).fit_predict(scaled)
    result["kmeans_nmi"] = float(normalized_mutual_info_score(routing.labels, clusters))
    result["probes"] = {}
    for name, data in probes.items():
        probe_feats, _ = teacher_pass(module, data.images)
        mean, std = linear_probe(probe_feats, data.labels, seed)
        result["probes"][name] = {"acc": mean, "std": std, "images": len(data.labels)}
    result["probe_mean_acc"] = float(np.mean([p["acc"] for p in result["probes"].values()]))
    if heldout:
        result["heldout"] = {}
        for name, data in heldout.items():
            probe_feats, _ = teacher_pass(module, data.images)
            mean, std = linear_probe(probe_feats, data.labels, seed)
            result["heldout"][name] = {"acc": mean, "std": std, "images": len(data.labels),
                                       "auc": probe_auc(probe_feats, data.labels, seed)}
        result["heldout_mean_auc"] = float(np.mean([p["auc"] for p in result["heldout"].values()]))
    return result
