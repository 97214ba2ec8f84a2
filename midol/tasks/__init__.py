"""Downstream tasks (docs/papers/m-idol.md, 'Downstream protocol'): linear probing and
fine-tuning of a pre-trained backbone for classification, multi-label classification and
segmentation."""

from midol.tasks.base import FinetuneModule
from midol.tasks.classification import ClassificationModule, LinearHead
from midol.tasks.multilabel import MultiLabelModule
from midol.tasks.segmentation import SegmentationModule

__all__ = [
    "ClassificationModule",
    "FinetuneModule",
    "LinearHead",
    "MultiLabelModule",
    "SegmentationModule",
]
