"""Pre-training data: image decoding, sources, multi-crop transforms, sampling, datamodule."""

from midol.data.image_io import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    UnreadableImageWarning,
    is_image_file,
    load_image,
)
from midol.data.labelled import LabelledDataModule, LabelledSource
from midol.data.pretrain import (
    Corpus,
    PretrainDataModule,
    PretrainDataset,
    RoutingCollate,
    RoutingDataset,
    pretrain_collate,
)
from midol.data.sampler import WeightedSourceSampler
from midol.data.segmentation import SegmentationDataModule, SegmentationSource
from midol.data.sources import DataSource, ResolvedSource, resolve_source
from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Corpus",
    "LabelledDataModule",
    "LabelledSource",
    "SegmentationDataModule",
    "SegmentationSource",
    "DataSource",
    "EvalTransform",
    "MultiCropTransform",
    "PretrainDataModule",
    "PretrainDataset",
    "ResolvedSource",
    "RoutingCollate",
    "RoutingDataset",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "WeightedSourceSampler",
    "is_image_file",
    "load_image",
    "pretrain_collate",
    "resolve_source",
]
