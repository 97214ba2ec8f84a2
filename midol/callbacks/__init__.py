"""Lightning callbacks shipped with midol."""

from midol.callbacks.export import ExportTeacherBackbone
from midol.callbacks.preemption import PreemptionCheckpoint
from midol.callbacks.routing_monitor import RoutingMonitor
from midol.callbacks.summary import PretrainSummary

__all__ = ["ExportTeacherBackbone", "PreemptionCheckpoint", "PretrainSummary", "RoutingMonitor"]
