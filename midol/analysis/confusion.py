"""Confusion matrix of a fine-tuned classifier (paper Fig. 7)."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from midol.analysis.plotting import new_figure


def confusion_counts(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = images of true class ``i`` predicted as class ``j``."""
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"targets {t.shape} and predictions {p.shape} must be equal-length vectors")
    if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes})")
    table = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


@torch.no_grad()
def predict(classifier: Any, batches: Iterable[dict[str, Any]], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """True class ids and arg-max predictions of a classifier taking uint8 images
    (``ClassificationModule.forward``) over ``{"image", "target"}`` batches."""
    classifier.eval()
    device = next(classifier.parameters()).device
    targets, preds = [], []
    total = len(batches) if isinstance(batches, Sized) else None
    for batch in tqdm(batches, desc="classifier", total=total, disable=not progress, leave=False):
        logits = classifier(batch["image"].to(device))
        preds.append(logits.argmax(dim=-1).cpu())
        targets.append(batch["target"].cpu())
    if not targets:
        raise ValueError("the classifier's evaluation split holds no image")
    target = torch.cat(targets)
    if target.ndim != 1:
        raise ValueError("a confusion matrix needs multi-class targets (one class id per image)")
    return target.numpy(), torch.cat(preds).numpy()


def confusion_figure(counts: np.ndarray, class_names: list[str], title: str = "confusion matrix") -> Figure:
    """Row-normalised colours (recall per true class) annotated with counts; the title carries
    the accuracy. Size: max(4.5, 0.6 K + 2.5) inches square for K classes."""
    table = np.asarray(counts, dtype=np.float64)
    k = table.shape[0]
    if table.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"counts {table.shape} do not match {len(class_names)} class names")
    shown = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    side = max(4.5, 0.6 * k + 2.5)
    fig = new_figure(side, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(table[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.6 else "black")
    accuracy = np.trace(table) / max(table.sum(), 1)
    ax.set_title(f"{title}\naccuracy {accuracy:.3f} ({int(table.sum())} images)", fontsize=10)
    return fig
