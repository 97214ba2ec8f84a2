"""Lightning callbacks shipped with midol."""

from midol.callbacks.backbone_export import ExportBackbone, ExportTeacherBackbone
from midol.callbacks.knn_monitor import KNNMonitor
from midol.callbacks.preemption import PreemptionCheckpoint
from midol.callbacks.pretrain_summary import PretrainSummary
from midol.callbacks.routing_monitor import RoutingMonitor

__all__ = [
    "ExportBackbone",
    "ExportTeacherBackbone",
    "KNNMonitor",
    "PreemptionCheckpoint",
    "PretrainSummary",
    "RoutingMonitor",
]
