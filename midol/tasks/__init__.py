"""Downstream tasks (docs/papers/m-idol.md, 'Downstream protocol'): linear probing and
fine-tuning of a pre-trained backbone for classification, multi-label classification and
segmentation; one prediction per group of images (a patient, a volume)."""

from midol.tasks.base import FinetuneModule
from midol.tasks.classification import ClassificationModule, LinearHead
from midol.tasks.group_classification import GroupClassificationModule
from midol.tasks.multilabel import MultiLabelModule
from midol.tasks.segmentation import SegmentationModule

__all__ = [
    "ClassificationModule",
    "FinetuneModule",
    "GroupClassificationModule",
    "LinearHead",
    "MultiLabelModule",
    "SegmentationModule",
]
