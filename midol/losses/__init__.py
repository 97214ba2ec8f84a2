"""M-IDoL losses in plain PyTorch (no Lightning), testable on their own."""

from midol.losses.dino import DINOLoss, dino_cross_entropy
from midol.losses.infonce import expert_infonce_loss
from midol.losses.load_balance import switch_load_balance_loss
from midol.losses.routing import (
    routing_consistency_loss,
    routing_cross_entropy,
    teacher_routing_log_probs,
)
from midol.losses.sinkhorn import (
    log_balanced_routing,
    log_sinkhorn_knopp,
    log_sinkhorn_knopp_authors,
    sinkhorn_knopp,
)

__all__ = [
    "DINOLoss",
    "dino_cross_entropy",
    "expert_infonce_loss",
    "log_balanced_routing",
    "log_sinkhorn_knopp",
    "log_sinkhorn_knopp_authors",
    "routing_consistency_loss",
    "routing_cross_entropy",
    "sinkhorn_knopp",
    "switch_load_balance_loss",
    "teacher_routing_log_probs",
]
