"""MedMIX: diagnosis from several inputs per patient, fusing frozen expert backbones of any
method (docs/papers/medmix.md). A supervised model that consumes the backbones the pre-training
methods export, so it sits above :mod:`midol.methods` and :mod:`midol.tasks`.

``module.py`` the LightningModule, ``experts.py`` building and running frozen experts,
``export.py`` the deployable model and its inference cost.
"""

from midol.fusion.module import MedMIX

__all__ = ["MedMIX"]
