"""Expert x modality routing matrix as a heat-map (paper Fig. 3a)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from matplotlib.figure import Figure

from midol.analysis.plotting import new_figure
from midol.utils.cluster_metrics import normalized_mutual_info, purity

Normalize = Literal["modality", "expert", "none"]


def routing_heatmap(
    counts: np.ndarray,
    modalities: list[str],
    normalize: Normalize = "modality",
    title: str | None = None,
) -> Figure:
    """Rows = experts, columns = modalities. Colours show each modality's share of images per
    expert (``modality``: columns sum to 1), each expert's share per modality (``expert``) or
    raw counts (``none``); every cell is annotated with its image count. The title carries
    NMI and purity when there are >= 2 modalities."""
    table = np.asarray(counts, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(modalities):
        raise ValueError(f"counts {table.shape} do not match {len(modalities)} modality names")
    if normalize == "modality":
        shown = table / np.maximum(table.sum(axis=0, keepdims=True), 1)
        label = "share of the modality's images"
    elif normalize == "expert":
        shown = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        label = "share of the expert's images"
    elif normalize == "none":
        shown, label = table, "images"
    else:
        raise ValueError(f"normalize must be 'modality', 'expert' or 'none', got {normalize!r}")
    n_exp, n_mod = table.shape
    fig = new_figure(max(4.0, 1.1 * n_mod + 2.0), max(3.0, 0.55 * n_exp + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, cmap="viridis", aspect="auto",
                      vmin=0, vmax=1 if normalize != "none" else max(shown.max(), 1))
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(range(n_mod), labels=modalities, rotation=30, ha="right")
    ax.set_yticks(range(n_exp), labels=[f"expert {i}" for i in range(n_exp)])
    ax.set_xlabel("modality (source label)")
    ax.set_ylabel("expert (top-1 routing)")
    top = shown.max() if shown.size else 0
    for i in range(n_exp):
        for j in range(n_mod):
            dark = shown[i, j] < 0.6 * (top if normalize == "none" else 1)
            ax.text(j, i, str(int(table[i, j])), ha="center", va="center",
                    color="white" if dark else "black", fontsize=8)
    heading = title or "teacher routing"
    if n_mod >= 2 and table.sum() > 0:
        heading += f"\nNMI {normalized_mutual_info(table):.3f}  purity {purity(table):.3f}"
    ax.set_title(heading, fontsize=10)
    return fig
