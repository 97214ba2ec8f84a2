"""LightningModules: one file per method."""

from midol.methods.classification import ClassificationModule
from midol.methods.finetune import FinetuneModule
from midol.methods.multilabel import MultiLabelModule
from midol.methods.pretrain import PretrainModule
from midol.methods.segmentation import SegmentationModule

__all__ = [
    "ClassificationModule",
    "FinetuneModule",
    "MultiLabelModule",
    "PretrainModule",
    "SegmentationModule",
]
