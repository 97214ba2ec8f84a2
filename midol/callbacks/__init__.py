"""Lightning callbacks shipped with midol."""

from midol.callbacks.export import ExportTeacherBackbone
from midol.callbacks.summary import PretrainSummary

__all__ = ["ExportTeacherBackbone", "PretrainSummary"]
