"""Pre-training methods on a shared base: :class:`BaseMethod` (schedules, optimiser groups,
non-finite policy, ...), :class:`MomentumMethod` (EMA teacher) and the methods built on them.

The downstream task modules live in :mod:`midol.tasks`; their old names here are aliases.
"""

from midol.methods.base import BaseMethod
from midol.methods.dex import DEX
from midol.methods.interfaces import ExpertChoice, Pretrained, Routed, Routing, StepOutput
from midol.methods.loading import load_method
from midol.methods.medmix import MedMIX
from midol.methods.midol import MIDoL, PretrainModule
from midol.methods.momentum import MomentumMethod
from midol.tasks import ClassificationModule, FinetuneModule, MultiLabelModule, SegmentationModule

__all__ = [
    "BaseMethod",
    "DEX",
    "ClassificationModule",
    "ExpertChoice",
    "FinetuneModule",
    "MedMIX",
    "MIDoL",
    "MomentumMethod",
    "MultiLabelModule",
    "PretrainModule",
    "Pretrained",
    "Routed",
    "Routing",
    "SegmentationModule",
    "StepOutput",
    "load_method",
]
