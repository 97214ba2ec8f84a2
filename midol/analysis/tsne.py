"""2-D embedding of teacher features coloured by modality (paper Fig. 5) and by expert."""

from __future__ import annotations

from typing import Literal

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from midol.analysis.plotting import new_figure

Method = Literal["tsne", "umap", "pca"]


def embed_2d(features: np.ndarray, method: Method = "tsne", seed: int = 0,
             perplexity: float = 30.0, threads: int | None = None) -> np.ndarray:
    """N x 2 coordinates of N x d features. ``tsne``: scikit-learn's Barnes-Hut
    t-SNE with PCA initialisation (perplexity capped at (N - 1) / 3, as it must be
    below N); ``umap``: umap-learn (an optional dependency); ``pca``: the first two principal
    components. ``threads`` caps the OpenMP/BLAS threads (None: the libraries' default); on a
    machine shared with other jobs, OpenMP threads busy-wait and one thread can be 100x faster
    (measured: t-SNE of 48 points, 25 s with the default vs 0.1 s with 1 thread, 2 loaded cores).
    """
    with threadpool_limits(limits=threads):
        return _embed(features, method, seed, perplexity)


def _embed(features: np.ndarray, method: Method, seed: int, perplexity: float) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 5:
        raise ValueError(f"need an N x d feature matrix with N >= 5, got {x.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(perplexity, (x.shape[0] - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ValueError("method 'umap' needs umap-learn (pip install umap-learn); "
                             "or use 'tsne'") from err
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'tsne', 'umap' or 'pca', got {method!r}")


def _scatter(ax, points: np.ndarray, labels: np.ndarray, names: list[str], title: str,
             palette: str | None = None) -> None:
    cmap = palette or ("tab10" if len(names) <= 10 else "tab20")
    colours = np.asarray(matplotlib.colormaps[cmap].colors)  # type: ignore[attr-defined]  # listed maps
    for k, name in enumerate(names):
        keep = labels == k
        if keep.any():
            ax.scatter(points[keep, 0], points[keep, 1], s=8, alpha=0.8,
                       color=colours[k % len(colours)], label=f"{name} ({int(keep.sum())})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best", frameon=True)


def embedding_figure(points: np.ndarray, modality: np.ndarray, modalities: list[str],
                     expert: np.ndarray | None = None, num_experts: int = 1,
                     method: str = "t-SNE") -> Figure:
    """One panel coloured by modality; a second one coloured by routed expert when there are
    several experts. Size: 5.5 x 5 inches per panel."""
    panels = 2 if expert is not None and num_experts > 1 else 1
    fig = new_figure(5.5 * panels, 5.0)
    _scatter(fig.add_subplot(1, panels, 1), points, modality, modalities,
             f"{method} of teacher features, by modality")
    if expert is not None and panels == 2:
        # another palette than the modalities', so expert 0 is not read as modality 0
        _scatter(fig.add_subplot(1, 2, 2), points, expert, [f"expert {i}" for i in range(num_experts)],
                 f"{method} of teacher features, by routed expert",
                 palette="Dark2" if num_experts <= 8 else "tab20b")
    return fig
