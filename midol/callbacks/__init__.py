"""Lightning callbacks shipped with midol."""

from midol.callbacks.backbone_export import ExportBackbone
from midol.callbacks.data_wait import DataWaitMonitor
from midol.callbacks.knn_monitor import KNNMonitor
from midol.callbacks.preemption import PreemptionCheckpoint
from midol.callbacks.pretrain_summary import PretrainSummary
from midol.callbacks.routing_monitor import RoutingMonitor
from midol.legacy import module_getattr

__getattr__ = module_getattr("midol.callbacks")  # ExportTeacherBackbone, the name of midol <= 0.1.0

__all__ = [
    "DataWaitMonitor",
    "ExportBackbone",
    "KNNMonitor",
    "PreemptionCheckpoint",
    "PretrainSummary",
    "RoutingMonitor",
]
