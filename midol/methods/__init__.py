"""LightningModules: one file per method."""

from midol.methods.pretrain import PretrainModule

__all__ = ["PretrainModule"]
