"""Transforms: pre-training views (multi-crop, or any :class:`ViewTransform`), evaluation crops
and labelled-task augmentations. All return uint8 tensors, normalised later on the device."""

from midol.data.transforms.base import ViewTransform
from midol.data.transforms.common import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from midol.data.transforms.eval import EvalTransform
from midol.data.transforms.multicrop import MultiCropTransform
from midol.data.transforms.single_view import SingleViewTransform
from midol.data.transforms.task import (
    ClassificationTrainTransform,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassificationTrainTransform",
    "EvalTransform",
    "MultiCropTransform",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "SingleViewTransform",
    "ViewTransform",
    "to_tensor",
]
