"""Data: one reader stack (folders, CSV, npz), pre-training corpora and datamodules, labelled
and segmentation datamodules, view transforms and the declared batch types."""

from midol.data.bags import BagDataModule
from midol.data.batches import ImageBatch, LabelledBatch, ViewBatch
from midol.data.corpus import Corpus, unique_modalities
from midol.data.image_io import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    UnreadableImageWarning,
    as_rgb,
    decode_image_bytes,
    is_image_file,
    load_image,
)
from midol.data.labelled import LabelledDataModule, LabelledSource
from midol.data.normalize import PixelNormalizer
from midol.data.patient_datamodule import PatientDataModule
from midol.data.pretrain import PretrainDataModule
from midol.data.pretrain_datasets import (
    PretrainDataset,
    RoutingCollate,
    RoutingDataset,
    ViewCollate,
)
from midol.data.readers import ImageList
from midol.data.sampler import WeightedSourceSampler
from midol.data.segmentation import SegmentationDataModule, SegmentationSource
from midol.data.sources import DataSource, resolve_source
from midol.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    SingleViewTransform,
    ViewTransform,
)

__all__ = [
    "BagDataModule",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Corpus",
    "DataSource",
    "EvalTransform",
    "ImageBatch",
    "ImageList",
    "LabelledBatch",
    "LabelledDataModule",
    "LabelledSource",
    "MultiCropTransform",
    "PatientDataModule",
    "PixelNormalizer",
    "PretrainDataModule",
    "PretrainDataset",
    "RoutingCollate",
    "RoutingDataset",
    "SegmentationDataModule",
    "SegmentationSource",
    "SingleViewTransform",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "ViewBatch",
    "ViewCollate",
    "ViewTransform",
    "WeightedSourceSampler",
    "as_rgb",
    "decode_image_bytes",
    "is_image_file",
    "load_image",
    "resolve_source",
    "unique_modalities",
]
