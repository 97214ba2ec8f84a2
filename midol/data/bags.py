"""Bags of images for group-level tasks: all images of one group (a patient's two eyes, a
volume's slices) are one sample with one label.

Two manifest layouts:

* a patient manifest (``image_columns``): one CSV row per group, its images in the named columns
  (an empty cell is an absent image), read by :func:`midol.data.patients.read_patient_table`;
* a per-image CSV (``group_column``): one row per image, ``path_column`` its file, the group id
  in ``group_column``; every image of a group must carry the group's label.

A batch is ``{"image": uint8 (B, M, 3, S, S), "mask": bool (B, M), "target": (B,) int64 or
(B, L) float32, "index": (B,)}``: every bag is padded with zero images to M, the largest bag of
the manifest (or ``max_instances``, which subsamples longer bags), so the default collate stacks
them; ``mask`` is True for real images (the task
module encodes only those, :class:`~midol.tasks.group_classification.GroupClassificationModule`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from midol.data.patients import read_patient_table
from midol.data.readers import ImageList, csv_base, read_csv_rows
from midol.data.task_datamodule import TaskDataModule
from midol.data.transforms.eval import EvalTransform
from midol.data.transforms.task import ClassificationTrainTransform

Task = Literal["multiclass", "multilabel"]
STAGES = ("train", "val", "test")


class BagDataset(Dataset[dict[str, Any]]):
    """Bags of images of one split, padded to ``max_size`` images.

    Args:
        images: Every image of the split (bags index into it).
        bags: Per bag, the indices of its images in ``images``.
        targets: One label per bag.
        transform: uint8 ``H x W x 3`` -> uint8 ``3 x S x S`` tensor, per image.
        max_size: The padded bag size M: a larger bag keeps ``max_size`` of its images (see
            ``sample``).
        sample: How a bag larger than ``max_size`` is cut down: ``random`` (training: a fresh
            subset each time, from torch's seeded global RNG, kept in bag order) or ``even``
            (evaluation: evenly spaced images, the same every time, e.g. every k-th slice).
    """

    def __init__(self, images: ImageList, bags: list[np.ndarray], targets: np.ndarray,
                 transform: Callable[[np.ndarray], torch.Tensor], max_size: int,
                 sample: Literal["random", "even"] = "even") -> None:
        if len(bags) != len(targets):
            raise ValueError(f"{len(bags)} bags but {len(targets)} targets")
        if any(len(b) == 0 for b in bags):
            raise ValueError("every bag needs at least one image")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if sample not in ("random", "even"):
            raise ValueError(f"sample must be 'random' or 'even', got {sample!r}")
        self.images, self.bags, self.targets = images, bags, targets
        self.transform = transform
        self.max_size = max_size
        self.sample = sample

    def __len__(self) -> int:
        return len(self.bags)

    def members(self, i: int) -> np.ndarray:
        """The images of bag ``i`` that this draw uses (all of them when it fits)."""
        bag = self.bags[i]
        if len(bag) <= self.max_size:
            return bag
        if self.sample == "random":
            return bag[np.sort(torch.randperm(len(bag))[: self.max_size].numpy())]
        return bag[np.linspace(0, len(bag) - 1, self.max_size).round().astype(np.int64)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        tensors = [self.transform(self.images.load(int(k))) for k in self.members(i)]
        first = tensors[0]
        padded = first.new_zeros((self.max_size, *first.shape))
        padded[: len(tensors)] = torch.stack(tensors)
        mask = torch.zeros(self.max_size, dtype=torch.bool)
        mask[: len(tensors)] = True
        return {"image": padded, "mask": mask, "target": torch.as_tensor(self.targets[i]), "index": i}


def _per_image_bags(manifest: str, path_column: str, group_column: str, label_columns: list[str],
                    task: Task, split_column: str, root: str | None
                    ) -> tuple[list[str], list[list[str]], np.ndarray, list[str], np.ndarray | None]:
    """(group ids in first-row order, per group its image paths, targets, label names, the
    split of each group or None without a split column) of a per-image CSV."""
    header = read_csv_rows(manifest, [path_column, group_column, *label_columns])
    has_split = split_column in header[0]
    base = csv_base(manifest, root)
    order: list[str] = []
    files: dict[str, list[str]] = {}
    labels: dict[str, tuple[str, ...]] = {}
    split: dict[str, str] = {}
    for n, row in enumerate(header):
        gid = (row[group_column] or "").strip()
        path = (row[path_column] or "").strip()
        if not gid or not path:
            raise ValueError(f"{manifest}: row {n + 2} has an empty {group_column!r} or {path_column!r}")
        label = tuple((row[c] or "").strip() for c in label_columns)
        if gid not in files:
            order.append(gid)
            files[gid], labels[gid] = [], label
            if has_split:
                split[gid] = (row[split_column] or "").strip()
        elif labels[gid] != label:
            raise ValueError(f"{manifest}: row {n + 2}: group {gid!r} has images with different "
                             f"labels ({labels[gid]} and {label}); a bag has one label")
        elif has_split and split[gid] != (row[split_column] or "").strip():
            raise ValueError(f"{manifest}: row {n + 2}: group {gid!r} is in two splits")
        files[gid].append(os.path.join(base, os.path.expanduser(path)))
    raw = [labels[g] for g in order]
    if task == "multilabel":
        values = {"0": 0.0, "0.0": 0.0, "1": 1.0, "1.0": 1.0}
        bad = next(((g, r) for g, r in zip(order, raw, strict=True) if any(c not in values for c in r)), None)
        if bad:
            raise ValueError(f"{manifest}: group {bad[0]!r}: multi-label values {bad[1]} are not 0/1")
        targets = np.array([[values[c] for c in r] for r in raw], dtype=np.float32)
        names = list(label_columns)
    else:
        cells = [r[0] for r in raw]
        try:
            ints = [int(c) for c in cells]
            names = [str(c) for c in sorted(set(ints))]
            targets = np.array([names.index(str(c)) for c in ints], dtype=np.int64)
        except ValueError:
            names = sorted(set(cells))
            targets = np.array([names.index(c) for c in cells], dtype=np.int64)
    splits = np.array([split[g] for g in order]) if has_split else None
    return order, [files[g] for g in order], targets, names, splits


class BagDataModule(TaskDataModule):
    """Group-level classification data: one bag of images per group, one label per bag.

    Args:
        manifest: The CSV (one row per group with ``image_columns``, else one row per image).
        label_columns: One class column (``multiclass``) or several 0/1 columns (``multilabel``).
        task: ``multiclass`` or ``multilabel`` (default: multilabel with several label columns).
        image_columns: Patient-manifest layout: the columns with each group's image paths.
        group_column: The group id column (both layouts; a patient manifest's id column).
        path_column: Per-image layout: the image path column.
        split_column: Each row's split (train/val/test); when the CSV lacks it, a seeded split
            of the groups (``val_fraction``, ``test_fraction``, ``split_seed``).
        root: Base folder of relative paths (default: the CSV's folder).
        image_size: Side of the square network input of every image.
        train_augment: Random-resized-crop and flips per training image (else the evaluation
            transform).
        crop_scale / hflip: The training augmentation's settings.
        max_instances: At most this many images per bag (e.g. slices of a long volume): training
            draws a random subset each epoch, evaluation takes evenly spaced ones; None keeps
            every image (bags are padded to the largest).
        **kwargs: Splitting and loading settings of
            :class:`~midol.data.task_datamodule.TaskDataModule` (batch_size counts bags).
    """

    def __init__(
        self,
        manifest: str,
        label_columns: list[str],
        task: Task | None = None,
        image_columns: list[str] | None = None,
        group_column: str = "patient_id",
        path_column: str = "path",
        split_column: str = "split",
        root: str | None = None,
        image_size: int = 224,
        train_augment: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        max_instances: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 (or null), got {max_instances}")
        self.max_instances = max_instances
        if not label_columns:
            raise ValueError("label_columns must name at least one column")
        task = task or ("multilabel" if len(label_columns) > 1 else "multiclass")
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        if task == "multiclass" and len(label_columns) != 1:
            raise ValueError(f"multiclass needs one label column, got {label_columns}")
        if image_columns is not None and not image_columns:
            raise ValueError("image_columns must name at least one column (or be null)")
        self.manifest, self.label_columns, self.task = manifest, list(label_columns), task
        self.image_columns = list(image_columns) if image_columns is not None else None
        self.group_column, self.path_column, self.split_column = group_column, path_column, split_column
        self.root = root
        self.image_size = image_size
        self.train_augment = train_augment
        self.train_transform: Callable[[np.ndarray], torch.Tensor] = (
            ClassificationTrainTransform(image_size, crop_scale, hflip, 0.0, 0.0)
            if train_augment else EvalTransform(image_size))
        self.eval_transform = EvalTransform(image_size)
        self.classes: list[str] | None = None
        self.group_ids: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        """Classes (multiclass) or labels (multilabel); read from the manifest on first use."""
        if self.classes is None:
            self.setup("fit")
        assert self.classes is not None
        return len(self.classes)

    def _read(self) -> tuple[list[str], list[list[str]], np.ndarray, np.ndarray]:
        """(group ids, per group its image files, targets, split per group)."""
        if self.image_columns is not None:
            inputs = [{"name": c, "kind": "image", "column": c, "modality": "image"} for c in self.image_columns]
            table = read_patient_table(self.manifest, inputs, self.label_columns, self.task,
                                       id_column=self.group_column, split_column=self.split_column,
                                       val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                       split_seed=self.split_seed, root=self.root)
            files = [table.image_files(c) for c in self.image_columns]
            per_group: list[list[str]] = [[p for f in files if (p := f[n]) is not None]
                                          for n in range(len(table))]
            self.classes = list(table.label_names)
            return list(table.patient_ids), per_group, table.targets, table.split
        ids, groups, targets, names, splits = _per_image_bags(
            self.manifest, self.path_column, self.group_column, self.label_columns, self.task,
            self.split_column, self.root)
        self.classes = names
        if splits is None:  # no split column: a seeded split of the groups, stratified by class
            carved = self.carve(_Indices(len(ids)), targets if self.task == "multiclass" else None,
                                False, False)
            splits = np.full(len(ids), "train", dtype="<U5")
            for stage, part in carved.items():
                splits[part.idx] = stage
        else:
            known = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
            unknown = sorted(set(splits.tolist()) - set(known))
            if unknown:
                raise ValueError(f"{self.manifest}: unknown split value(s) {unknown} in {self.split_column!r}")
            splits = np.array([known[s] for s in splits.tolist()])
        return ids, groups, targets, splits

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        ids, per_group, targets, splits = self._read()
        paths = [p for group in per_group for p in group]
        images = ImageList(self.manifest, paths=paths)
        images.check_files()
        starts = np.cumsum([0] + [len(g) for g in per_group])
        bags = [np.arange(starts[n], starts[n + 1]) for n in range(len(per_group))]
        max_size = max(len(b) for b in bags)
        if self.max_instances is not None:
            max_size = min(max_size, self.max_instances)
        for k in STAGES:
            rows = np.flatnonzero(np.asarray(splits) == k)
            if not len(rows):
                continue
            self.group_ids[k] = [ids[n] for n in rows]
            self.datasets[k] = BagDataset(images, [bags[n] for n in rows], targets[rows],
                                          self.train_transform if k == "train" else self.eval_transform,
                                          max_size, "random" if k == "train" else "even")
        if "train" not in self.datasets:
            raise ValueError(f"{self.manifest}: the training split has no group")


class _Indices:
    """``subset``-able index list, so :meth:`TaskDataModule.carve` splits groups."""

    def __init__(self, n: int, idx: np.ndarray | None = None) -> None:
        self.idx = np.arange(n) if idx is None else idx

    def __len__(self) -> int:
        return len(self.idx)

    def subset(self, idx: np.ndarray) -> _Indices:
        return _Indices(len(idx), self.idx[idx])
