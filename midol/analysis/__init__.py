"""What a pre-trained model learned: routing metrics and the plots of ``midol analyze``.

Plot modules (tsne, heatmap, curves, confusion, gradcam) import matplotlib lazily, so importing
this package stays light.
"""

from midol.utils.cluster_metrics import (
    distribution_stats,
    entropy,
    mean_pairwise_cosine,
    modality_coverage,
    mutual_information,
    normalized_entropy,
    normalized_mutual_info,
    purity,
    routing_report,
)

__all__ = [
    "distribution_stats",
    "entropy",
    "mean_pairwise_cosine",
    "modality_coverage",
    "mutual_information",
    "normalized_entropy",
    "normalized_mutual_info",
    "purity",
    "routing_report",
]
