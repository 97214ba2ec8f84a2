"""Pre-training methods on a shared base: :class:`BaseMethod` (schedules, optimiser groups,
non-finite policy, ...), :class:`MomentumMethod` (EMA teacher) and the methods built on them.

The downstream task modules live in :mod:`midol.tasks` and MedMIX in :mod:`midol.fusion`; their
old names here resolve through :mod:`midol.legacy` with a DeprecationWarning.
"""

from midol.legacy import module_getattr
from midol.methods.base import BaseMethod
from midol.methods.dex import DEX
from midol.methods.interfaces import (
    BackboneExport,
    ExpertChoice,
    Pretrained,
    Routed,
    Routing,
    StepOutput,
)
from midol.methods.loading import load_method
from midol.methods.midol import MIDoL, PretrainModule
from midol.methods.momentum import MomentumMethod

__getattr__ = module_getattr("midol.methods")

__all__ = [
    "BackboneExport",
    "BaseMethod",
    "DEX",
    "ExpertChoice",
    "MIDoL",
    "MomentumMethod",
    "PretrainModule",
    "Pretrained",
    "Routed",
    "Routing",
    "StepOutput",
    "load_method",
]
