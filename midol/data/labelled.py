"""Labelled images for downstream classification: class-per-folder trees, CSV manifests (a path
column and one or several label columns) and MedMNIST ``.npz`` files with their official splits.

Every split (train/val/test) is a :class:`LabelledSource`; a split that is not given can be
carved out of the training source with a seeded (stratified) split. Batches are
``{"image": uint8 (B, 3, S, S), "target": (B,) int64 or (B, L) float32, "index": (B,)}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from midol.data.image_io import is_image_file
from midol.data.readers import (
    ImageList,
    csv_base,
    image_extensions,
    read_csv_rows,
    read_npz_arrays,
    resolve_kind,
    scan_images,
)
from midol.data.task_datamodule import TaskDataModule
from midol.data.transforms.eval import EvalTransform
from midol.data.transforms.task import ClassificationTrainTransform

Task = Literal["multiclass", "multilabel"]
UncertainPolicy = Literal["error", "zero", "one"]


@dataclass
class LabelledSource:
    """Where the labelled images of one split are.

    Attributes:
        path: A class-per-folder tree (``path/<class>/**/*.png``), a ``.csv`` manifest or a
            MedMNIST-style ``.npz``.
        kind: ``auto`` picks npz for ``*.npz``, csv for ``*.csv``, folder for a directory.
        split: npz: which ``{split}_images``/``{split}_labels`` pair (``train``/``val``/``test``);
            csv: keep only rows whose ``split_column`` equals this value (None keeps all rows).
        split_column: CSV column naming each row's split.
        path_column: CSV column with image paths (relative to ``root``).
        label_columns: CSV label columns: one for multi-class (class names or integer ids),
            several 0/1 columns for multi-label.
        root: CSV only: base folder of relative paths (default: the CSV's folder).
    """

    path: str
    kind: Literal["auto", "folder", "csv", "npz"] = "auto"
    split: str | None = None
    split_column: str = "split"
    path_column: str = "path"
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    root: str | None = None

    def resolved_kind(self) -> Literal["folder", "csv", "npz"]:
        return resolve_kind(self.path, self.kind, f"labelled data {self.path!r}")


def read_folder(src: LabelledSource) -> tuple[ImageList, list[str]]:
    """Class-per-folder tree -> image paths and their class-folder names."""
    if src.split is not None:
        raise ValueError(f"{src.path}: 'split' applies to csv/npz; point path at the split's folder")
    root = os.path.expanduser(src.path)
    classes = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        loose = [f for f in os.listdir(root) if is_image_file(f)]
        what = f"{len(loose)} images but no class sub-folder" if loose else "empty folder"
        raise ValueError(f"{src.path}: {what} (expected one sub-folder of images per class)")
    paths: list[str] = []
    names: list[str] = []
    for name in classes:
        files = scan_images(os.path.join(root, name))
        if not files:
            raise ValueError(
                f"{os.path.join(src.path, name)}: empty class folder (no file with extension "
                f"{image_extensions()})"
            )
        paths += files
        names += [name] * len(files)
    return ImageList(src.path, paths=paths), names


def read_csv(src: LabelledSource) -> tuple[ImageList, list[list[str]]]:
    rows = read_csv_rows(src.path, [src.path_column, *src.label_columns], src.split_column, src.split)
    base = csv_base(src.path, src.root)
    paths, labels = [], []
    for n, row in enumerate(rows):
        cell = (row[src.path_column] or "").strip()
        if not cell:
            raise ValueError(f"{src.path}: row {n + 2} has an empty {src.path_column!r}")
        paths.append(os.path.join(base, os.path.expanduser(cell)))
        labels.append([(row[c] or "").strip() for c in src.label_columns])
    return ImageList(src.path, paths=paths), labels


def read_npz(src: LabelledSource) -> tuple[ImageList, np.ndarray]:
    split = src.split or "train"
    keys = (f"{split}_images", f"{split}_labels")
    arrays = read_npz_arrays(src.path, keys)
    images, labels = arrays[keys[0]], arrays[keys[1]]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{src.path}: {keys[0]} must be uint8 N x H x W [x C], got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{src.path}: {len(images)} images but {len(labels)} labels in split {split!r}")
    if len(images) == 0:
        raise ValueError(f"{src.path}: split {split!r} is empty")
    return ImageList(src.path, arrays=[(split, images)]), labels.reshape(len(labels), -1)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@dataclass
class LabelledSplit:
    """One split: images and their targets (int64 class ids, or float32 0/1 label rows)."""

    images: ImageList
    targets: np.ndarray

    def subset(self, idx: np.ndarray) -> LabelledSplit:
        return LabelledSplit(self.images.subset(idx), self.targets[idx])

    def __len__(self) -> int:
        return len(self.images)


def _multiclass_ids(raw: Sequence[str] | np.ndarray, classes: list[str] | None, table: ImageList) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        if raw.shape[1] != 1:
            raise ValueError(f"{table.origin}: labels have {raw.shape[1]} columns; use task: multilabel")
        return raw[:, 0].astype(np.int64)
    if classes is not None and not all(_is_int(r) for r in raw):
        index = {c: i for i, c in enumerate(classes)}
        unknown = [(i, r) for i, r in enumerate(raw) if r not in index]
        if unknown:
            i, r = unknown[0]
            raise ValueError(f"{table.describe(i)}: label {r!r} is not one of the classes {classes}")
        return np.array([index[r] for r in raw], dtype=np.int64)
    return np.array([int(r) for r in raw], dtype=np.int64)


def _multilabel_rows(raw: list[list[str]] | np.ndarray, table: ImageList, uncertain: UncertainPolicy) -> np.ndarray:
    values = {"0": 0.0, "0.0": 0.0, "1": 1.0, "1.0": 1.0}
    if uncertain != "error":
        fill = 0.0 if uncertain == "zero" else 1.0
        values.update({"-1": fill, "-1.0": fill, "": fill})
    if isinstance(raw, np.ndarray):
        raw = [[str(int(v)) for v in row] for row in raw]
    out = np.zeros((len(raw), len(raw[0]) if raw else 0), dtype=np.float32)
    for i, row in enumerate(raw):
        for j, cell in enumerate(row):
            if cell not in values:
                hint = " (uncertain label: set uncertain_label to zero or one)" if cell in ("-1", "-1.0", "") else ""
                raise ValueError(f"{table.describe(i)}: multi-label value {cell!r} is not 0 or 1{hint}")
            out[i, j] = values[cell]
    return out


def check_class_range(split: LabelledSplit, num_classes: int) -> None:
    """``ValueError`` naming the first item whose class id lies outside ``[0, num_classes)``."""
    bad = np.flatnonzero((split.targets < 0) | (split.targets >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{split.images.describe(i)}: label {int(split.targets[i])} outside the class range "
            f"[0, {num_classes}) ({bad.size} such item(s))"
        )


class LabelledDataset(Dataset[dict[str, Any]]):
    def __init__(self, split: LabelledSplit, transform: Callable[[np.ndarray], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.transform(self.split.images.load(i)),
            "target": torch.as_tensor(self.split.targets[i]),
            "index": i,
        }


class LabelledDataModule(TaskDataModule):
    """Multi-class or multi-label images from folders, CSV manifests or MedMNIST ``.npz``.

    Args:
        train: The training source.
        val: The validation source; when absent, ``val_fraction`` of ``train`` is split off
            with ``split_seed`` (stratified by class for multi-class).
        test: The test source; when absent, ``test_fraction`` of ``train`` is split off.
        task: ``multiclass`` (one class id per image) or ``multilabel`` (0/1 per label column).
        classes: Class names in id order (multi-class; default: sorted class-folder names or
            label values of ``train``; integer labels are used as ids). For multi-label: names
            of the label columns (default: ``label_columns``).
        num_classes: Number of classes (default: from ``classes`` or the largest train id + 1);
            a label outside ``[0, num_classes)`` is an error naming the file.
        image_size: Side of the square network input.
        crop_scale: training random-resized-crop area range.
        hflip: training horizontal-flip probability.
        vflip: training vertical-flip probability.
        color_jitter: training colour-jitter strength (0 = off).
        train_augment: False trains on the evaluation transform (resize + centre crop).
        uncertain_label: multi-label cells ``-1`` or empty (CheXpert's uncertain): ``error``,
            ``zero`` (U-Zeros) or ``one`` (U-Ones).
        **kwargs: splitting and loading settings of
            :class:`~midol.data.task_datamodule.TaskDataModule` (``val_fraction``,
            ``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        train: LabelledSource,
        val: LabelledSource | None = None,
        test: LabelledSource | None = None,
        task: Task = "multiclass",
        classes: list[str] | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float = 0.0,
        train_augment: bool = True,
        uncertain_label: UncertainPolicy = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        self.sources = {"train": train, "val": val, "test": test}
        self.task = task
        self.classes = list(classes) if classes is not None else None
        self._num_classes = num_classes
        self.image_size = image_size
        self.uncertain_label = uncertain_label
        self.train_augment = train_augment
        self.train_transform = (
            ClassificationTrainTransform(image_size, crop_scale, hflip, vflip, color_jitter)
            if train_augment else EvalTransform(image_size)
        )
        self.eval_transform = EvalTransform(image_size)
        self.splits: dict[str, LabelledSplit] = {}

    # ------------------------------------------------------------------ reading
    def _read(self, src: LabelledSource) -> tuple[ImageList, Any]:
        kind = src.resolved_kind()
        if kind == "folder":
            return read_folder(src)
        if kind == "csv":
            table, rows = read_csv(src)
            if self.task == "multiclass":
                if len(src.label_columns) != 1:
                    raise ValueError(f"{src.path}: multi-class needs one label column, got {src.label_columns}")
                return table, [r[0] for r in rows]
            return table, rows
        return read_npz(src)

    def _targets(self, table: ImageList, raw: Any) -> np.ndarray:
        if self.task == "multilabel":
            if not isinstance(raw, np.ndarray) and raw and not isinstance(raw[0], list):
                raise ValueError(f"{table.origin}: a class-per-folder tree cannot hold multi-label targets")
            return _multilabel_rows(raw, table, self.uncertain_label)
        return _multiclass_ids(raw, self.classes, table)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        raw = {k: self._read(s) for k, s in self.sources.items() if s is not None}
        if self.task == "multiclass" and self.classes is None:
            train_raw = raw["train"][1]
            if not isinstance(train_raw, np.ndarray) and not all(_is_int(r) for r in train_raw):
                self.classes = sorted(set(train_raw))
        splits = {k: LabelledSplit(t, self._targets(t, r)) for k, (t, r) in raw.items()}
        for split in splits.values():
            split.images.check_files()
        self._finalise_classes(splits)
        strata = splits["train"].targets if self.task == "multiclass" else None
        splits = {**splits, **self.carve(splits["train"], strata, "val" in splits, "test" in splits)}
        for k, split in splits.items():
            if len(split) == 0:
                train = self.sources["train"]
                raise ValueError(f"the {k} split is empty (source {train.path if train else None})")
        self.splits = splits
        self.datasets = {
            k: LabelledDataset(s, self.train_transform if k == "train" else self.eval_transform)
            for k, s in splits.items()
        }

    def _finalise_classes(self, splits: dict[str, LabelledSplit]) -> None:
        if self.task == "multilabel":
            widths = {s.targets.shape[1] for s in splits.values()}
            if len(widths) != 1:
                raise ValueError(f"splits have different numbers of labels: {sorted(widths)}")
            width = widths.pop()
            if self._num_classes is not None and self._num_classes != width:
                raise ValueError(f"num_classes={self._num_classes} but the data have {width} labels")
            self._num_classes = width
            if self.classes is None:
                src = self.sources["train"]
                assert src is not None  # the training source is required
                self.classes = list(src.label_columns) if len(src.label_columns) == width else [
                    str(i) for i in range(width)]
            return
        if self._num_classes is None:
            self._num_classes = len(self.classes) if self.classes else int(splits["train"].targets.max()) + 1
        for split in splits.values():
            check_class_range(split, self._num_classes)
        if self.classes is None:
            self.classes = [str(i) for i in range(self._num_classes)]
        elif len(self.classes) != self._num_classes:
            raise ValueError(f"{len(self.classes)} class names given for num_classes={self._num_classes}")

    @property
    def num_classes(self) -> int:
        """Number of classes (multi-class) or labels (multi-label); known after setup unless set."""
        if self._num_classes is None:
            self.setup("fit")
        assert self._num_classes is not None
        return self._num_classes
