"""Image + mask pairs for segmentation: a CSV of pairs, or ``images/`` and ``masks/`` folders.

Masks are single-channel files. ``binary`` masks (0/255 lesions, vessels) become classes
{0, 1} by thresholding; ``index`` masks hold class ids directly. An optional region mask
(e.g. DRIVE's field of view) marks pixels outside it as ``ignore_index``: they count in
neither the loss nor the metrics. Batches: ``{"image": uint8 (B, 3, S, S), "target": int64
(B, S, S), "index": (B,)}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from midol.data.image_io import UnreadableImageError, image_formats, load_image
from midol.data.readers import csv_base, read_csv_rows, scan_images
from midol.data.task_datamodule import TaskDataModule
from midol.data.transforms.task import SegmentationEvalTransform, SegmentationTrainTransform

MaskMode = Literal["binary", "index"]


@dataclass
class SegmentationSource:
    """Where the image/mask pairs of one split are.

    Attributes:
        path: A ``.csv`` of pairs, or a folder holding ``image_dir`` and ``mask_dir``.
        image_column: CSV column with the image paths.
        mask_column: CSV column with the mask paths.
        region_column: Optional CSV column with a region mask (non-zero = evaluated); pixels
            outside it become ``ignore_index`` (DRIVE: ``fov_mask``).
        split_column: CSV column naming each row's split.
        split: keep only CSV rows whose ``split_column`` equals this (None keeps all rows).
        root: base folder of the CSV's relative paths (default: the CSV's folder).
        image_dir: folder layout: the sub-folder with the images.
        mask_dir: folder layout: the sub-folder with the masks.
        mask_suffix: folder layout: mask of ``images/x.jpg`` is ``masks/x<mask_suffix>.<any
            image extension>`` (e.g. ``_lesion`` for PH2, ``_segmentation`` for ISIC 2018).
    """

    path: str
    image_column: str = "image"
    mask_column: str = "mask"
    region_column: str | None = None
    split_column: str = "split"
    split: str | None = None
    root: str | None = None
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""


@dataclass
class PairTable:
    """Paths of image/mask(/region) triples; ``subset`` for seeded splits."""

    images: list[str]
    masks: list[str]
    regions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> PairTable:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PairTable(pick(self.images), pick(self.masks), pick(self.regions) if self.regions else None)


def _pairs_from_csv(src: SegmentationSource) -> PairTable:
    cols = [src.image_column, src.mask_column] + ([src.region_column] if src.region_column else [])
    rows = read_csv_rows(src.path, cols, src.split_column, src.split)
    base = csv_base(src.path, src.root)
    path = lambda row, col: os.path.join(base, (row[col] or "").strip())  # noqa: E731
    return PairTable(
        [path(r, src.image_column) for r in rows],
        [path(r, src.mask_column) for r in rows],
        [path(r, src.region_column) for r in rows] if src.region_column else None,
    )


def _pairs_from_folders(src: SegmentationSource) -> PairTable:
    if src.split is not None:
        raise ValueError(f"{src.path}: 'split' applies to a CSV; point path at the split's folder")
    image_dir = os.path.join(os.path.expanduser(src.path), src.image_dir)
    mask_dir = os.path.join(os.path.expanduser(src.path), src.mask_dir)
    for d in (image_dir, mask_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{src.path}: folder {d} not found (set image_dir/mask_dir)")
    images = scan_images(image_dir)
    if not images:
        raise ValueError(f"{image_dir}: empty folder (no image file; formats: {image_formats()})")
    by_stem = {Path(m).stem: m for m in scan_images(mask_dir)}
    masks = []
    for img in images:
        stem = Path(img).stem + src.mask_suffix
        if stem not in by_stem:
            raise FileNotFoundError(f"{img}: no mask {os.path.join(mask_dir, stem)}.<ext> (set mask_suffix)")
        masks.append(by_stem[stem])
    return PairTable(images, masks)


def read_pairs(src: SegmentationSource) -> PairTable:
    """List the pairs of ``src``; ``FileNotFoundError`` for a missing listed file."""
    path = os.path.expanduser(src.path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"segmentation data not found: {src.path}")
    table = _pairs_from_csv(src) if path.lower().endswith(".csv") else _pairs_from_folders(src)
    files = table.images + table.masks + (table.regions or [])
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{src.path}: {len(missing)} listed file(s) do not exist, e.g. {', '.join(missing[:3])}")
    return table


def check_sizes(table: PairTable) -> None:
    """``ValueError`` naming the first pair whose mask (or region) size differs from its image
    (reads file headers only)."""
    for i, image in enumerate(table.images):
        size = _size(image)
        for other in (table.masks[i], table.regions[i] if table.regions else None):
            if other is not None and _size(other) != size:
                raise ValueError(
                    f"mask {other} is {_size(other)[0]}x{_size(other)[1]} (WxH) but its image "
                    f"{image} is {size[0]}x{size[1]}"
                )


def _size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as err:
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err


def read_mask(path: str, mode: MaskMode, threshold: int = 128) -> np.ndarray:
    """Single-channel class ids (uint8 ``H x W``): ``binary`` -> ``gray >= threshold``;
    ``index`` -> stored values (palette indices for ``P`` images)."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "binary":
                return (np.asarray(im.convert("L")) >= threshold).astype(np.uint8)
            if im.mode in ("P", "L", "1"):
                return np.asarray(im if im.mode != "1" else im.convert("L"), dtype=np.uint8)
            arr = np.asarray(im)
    except Exception as err:
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err
    if arr.ndim == 3 and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{path}: an index mask must be single-channel with ids 0..255, got {arr.dtype} {arr.shape}")
    return arr.astype(np.uint8)


class SegmentationDataset(Dataset[dict[str, Any]]):
    def __init__(self, table: PairTable, transform: Any, num_classes: int, mask_mode: MaskMode,
                 ignore_index: int, threshold: int = 128):
        self.table = table
        self.transform = transform
        self.num_classes = num_classes
        self.mask_mode = mask_mode
        self.ignore_index = ignore_index
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self.table)

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (uint8 H x W x 3) and class ids (uint8 H x W, ignore_index outside the region)."""
        image = load_image(self.table.images[i])
        mask = read_mask(self.table.masks[i], self.mask_mode, self.threshold)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {self.table.masks[i]} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{self.table.images[i]} is {image.shape[1]}x{image.shape[0]}"
            )
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"mask {self.table.masks[i]}: class id {int(mask[bad].max())} outside the class "
                f"range [0, {self.num_classes}) (and not ignore_index={self.ignore_index})"
            )
        if self.table.regions is not None:
            region = read_mask(self.table.regions[i], "binary", self.threshold)
            if region.shape != mask.shape:
                raise ValueError(f"region mask {self.table.regions[i]} differs in size from {self.table.masks[i]}")
            mask = np.where(region > 0, mask, np.uint8(self.ignore_index))
        return image, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.transform(*self.load_pair(i))
        return {"image": image, "target": mask, "index": i}


class SegmentationDataModule(TaskDataModule):
    """Image/mask pairs for semantic segmentation.

    Args:
        train: The training source.
        val: The validation source; when absent, ``val_fraction`` of ``train`` is split off.
        test: The test source; when absent, ``test_fraction`` of ``train`` is split off.
        num_classes: Classes including background (binary masks: 2).
        mask_mode: ``binary`` (foreground where gray >= ``mask_threshold``) or ``index``.
        mask_threshold: Threshold of binary masks (0-255).
        ignore_index: Target value excluded from loss and metrics (outside ``region_column``).
        image_size: Side of the square network input (training crops and evaluation resize).
        crop_scale: training random-resized-crop area range.
        hflip: training horizontal-flip probability.
        vflip: training vertical-flip probability.
        **kwargs: splitting and loading settings of
            :class:`~midol.data.task_datamodule.TaskDataModule` (``val_fraction``,
            ``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        train: SegmentationSource,
        val: SegmentationSource | None = None,
        test: SegmentationSource | None = None,
        num_classes: int = 2,
        mask_mode: MaskMode = "binary",
        mask_threshold: int = 128,
        ignore_index: int = 255,
        image_size: int = 512,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if mask_mode not in ("binary", "index"):
            raise ValueError(f"mask_mode must be 'binary' or 'index', got {mask_mode!r}")
        if mask_mode == "binary" and num_classes != 2:
            raise ValueError(f"binary masks have 2 classes, got num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class id < {num_classes}")
        self.sources = {"train": train, "val": val, "test": test}
        self.num_classes = num_classes
        self.mask_mode = mask_mode
        self.mask_threshold = mask_threshold
        self.ignore_index = ignore_index
        self.image_size = image_size
        self.train_transform = SegmentationTrainTransform(image_size, crop_scale, hflip, vflip)
        self.eval_transform = SegmentationEvalTransform(image_size)
        self.tables: dict[str, PairTable] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tables = {k: read_pairs(s) for k, s in self.sources.items() if s is not None}
        for table in tables.values():
            check_sizes(table)
        tables.update(self.carve(tables["train"], None, "val" in tables, "test" in tables))
        for k, table in tables.items():
            if len(table) == 0:
                train = self.sources["train"]
                raise ValueError(f"the {k} split is empty (source {train.path if train else None})")
        self.tables = tables
        self.datasets = {
            k: SegmentationDataset(
                t, self.train_transform if k == "train" else self.eval_transform,
                self.num_classes, self.mask_mode, self.ignore_index, self.mask_threshold,
            )
            for k, t in tables.items()
        }
