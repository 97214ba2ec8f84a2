"""Patients with several named inputs (MedMIX): a LightningDataModule over a patient manifest.

The manifest is read once by :func:`~midol.data.patients.read_patient_table`; each split is a
:class:`PatientDataset`. An item (batched by torch's default collate) is::

    {"index":     int64 scalar, the row in the FULL table (not the position in the split),
     "present":   bool M (inputs in spec order; natural presence, minus unreadable images),
     "target":    float32 L (multilabel) or int64 scalar (multiclass),
     "tabular":   {name: {"numeric": float32 n (NaN where missing), "numeric_present": bool n,
                          "categorical": int64 c (MISSING_CODE where missing)}},   # if any
     "embedding": {name: float32 D (NaN where absent)},                            # if any
     "image":     {name: uint8 3 x S x S}}                         # only with load_images

An absent image is a zero placeholder in ``"image"`` so that the batch stacks; ``present``
says False for it and the model must mask it (it is never an input to anything).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from midol.data.image_io import UnreadableImageError, UnreadableImageWarning, load_image
from midol.data.patients import InputSpec, PatientTable, Task, check_inputs, read_patient_table
from midol.data.task_datamodule import TaskDataModule
from midol.data.transforms.eval import EvalTransform


class UnreadablePatientError(ValueError):
    """A patient whose every present input turned out unreadable at load time."""


class PatientDataset(Dataset[dict[str, Any]]):
    """The patients ``rows`` of ``table``; ``load_images`` False leaves pixels out (the model
    reads cached expert features by ``index``)."""

    def __init__(self, table: PatientTable, rows: np.ndarray, load_images: bool = True,
                 image_size: int = 224) -> None:
        self.table = table
        self.rows = np.asarray(rows, dtype=np.int64)
        self.load_images = load_images
        self.image_size = image_size
        self.transform = EvalTransform(image_size)
        self._warned: set[str] = set()
        specs = table.inputs
        self._image_inputs = [(m, s.name) for m, s in enumerate(specs) if s.kind == "image"]
        self._files = {name: table.image_files(name) for _, name in self._image_inputs}
        self._tabular = {s.name: table.tabular(s.name) for s in specs if s.kind == "tabular"}
        self._embedding = {s.name: table.embeddings(s.name) for s in specs if s.kind == "embedding"}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        present = torch.from_numpy(self.table.present[row].copy())
        target = self.table.targets[row]
        item: dict[str, Any] = {
            "index": torch.tensor(row, dtype=torch.int64),
            "present": present,
            "target": torch.tensor(target, dtype=torch.float32 if self.table.task == "multilabel"
                                   else torch.int64),
        }
        if self._tabular:
            item["tabular"] = {
                name: {"numeric": torch.from_numpy(t.numeric[row].copy()),
                       "numeric_present": torch.from_numpy(t.numeric_present[row].copy()),
                       "categorical": torch.from_numpy(t.categorical[row].copy())}
                for name, t in self._tabular.items()
            }
        if self._embedding:
            item["embedding"] = {name: torch.from_numpy(e[row].copy())
                                 for name, e in self._embedding.items()}
        if self.load_images and self._image_inputs:
            item["image"] = self._images(row, present)
        return item

    def _images(self, row: int, present: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.image_size
        out: dict[str, torch.Tensor] = {}
        last: UnreadableImageError | None = None
        for m, name in self._image_inputs:
            path = self._files[name][row]
            if path is not None and bool(present[m]):
                try:
                    out[name] = self.transform(load_image(path))
                    continue
                except UnreadableImageError as err:
                    last = err
                    present[m] = False
                    if path not in self._warned:
                        self._warned.add(path)
                        warnings.warn(f"{err}; input {name!r} of patient "
                                      f"{self.table.patient_ids[row]} treated as absent",
                                      UnreadableImageWarning, stacklevel=3)
            out[name] = torch.zeros(3, size, size, dtype=torch.uint8)
        if last is not None and not bool(present.any()):
            raise UnreadablePatientError(
                f"{self.table.manifest}: patient {self.table.patient_ids[row]} has no readable "
                f"input left ({last})"
            ) from last
        return out


class PatientDataModule(TaskDataModule):
    """Patients with several named inputs (images, tabular columns, precomputed embeddings)
    from one CSV manifest, one row per patient (MedMIX; ``docs/papers/medmix.md``).

    Args:
        manifest: The CSV manifest (one row per patient).
        inputs: The named inputs, dicts of :class:`~midol.data.patients.InputSpec` fields:
            ``name``, ``kind`` (image, tabular or embedding), ``column`` (image: path column;
            embedding: column of ``.npy``/``.safetensors`` paths), ``numeric`` and
            ``categorical`` (tabular columns), ``modality`` (image inputs sharing experts).
        label_columns: 0/1 label columns (multilabel) or one class column (multiclass).
        task: ``multilabel``, ``multiclass``, or None: multilabel with several label columns,
            multiclass with one.
        id_column: Column of patient ids (absent: 1-based row numbers).
        split_column: Column of each patient's split (train/val/valid/validation/test); None or
            absent from the CSV: a seeded split with val_fraction/test_fraction/split_seed.
        val_fraction: validation fraction of the seeded split (stratified by class, or for
            multilabel by "has any positive label"); unused with a split column.
        test_fraction: test fraction of the seeded split.
        split_seed: seed of the seeded split.
        root: Base folder of relative paths in the manifest (default: the CSV's folder).
        image_size: Side of the square image input (pixel mode only).
        load_images: False leaves pixels out of the batches (a model that reads cached expert
            features calls :meth:`set_load_images`).
        batch_size, eval_batch_size, num_workers, drop_last, pin_memory, persistent_workers:
            loading, as in :class:`~midol.data.task_datamodule.TaskDataModule`.
    """

    def __init__(
        self,
        manifest: str,
        inputs: list[dict[str, Any]],
        label_columns: list[str],
        task: Literal["multilabel", "multiclass"] | None = None,
        id_column: str = "patient_id",
        split_column: str | None = "split",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        root: str | None = None,
        image_size: int = 224,
        load_images: bool = True,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            drop_last=drop_last, pin_memory=pin_memory, persistent_workers=persistent_workers,
        )
        # saved in checkpoints (datamodule_hyper_parameters): `midol robustness` rebuilds the data
        self.save_hyperparameters()
        self.specs: list[InputSpec] = check_inputs(inputs)  # fail at configuration time
        self.manifest = manifest
        self.label_columns = list(label_columns)
        if not self.label_columns:
            raise ValueError("label_columns must name at least one column")
        if task is None:
            task = "multilabel" if len(self.label_columns) > 1 else "multiclass"
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
        self._task: Task = task
        self.id_column = id_column
        self.split_column = split_column
        self.root = root
        EvalTransform(image_size)  # validates the size now
        self.image_size = image_size
        self.load_images = load_images
        self.table: PatientTable | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.table is None:
            self.table = read_patient_table(
                self.manifest, self.specs, self.label_columns, task=self._task,
                id_column=self.id_column, split_column=self.split_column,
                val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                split_seed=self.split_seed, root=self.root,
            )
            print(f"patients of {self.manifest}:\n{self.table.summary()}")
        if not self.datasets:
            for split in ("train", "val", "test"):
                rows = self.table.rows(split)
                if len(rows):
                    self.datasets[split] = PatientDataset(self.table, rows, self.load_images,
                                                          self.image_size)

    def set_load_images(self, load: bool) -> None:
        """Whether batches carry pixels (False: a model reading cached expert features)."""
        self.load_images = bool(load)
        for dataset in self.datasets.values():
            dataset.load_images = self.load_images  # type: ignore[attr-defined]

    def _table(self) -> PatientTable:
        if self.table is None:
            self.setup("fit")
        assert self.table is not None
        return self.table

    @property
    def task(self) -> Task:
        return self._task

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def classes(self) -> list[str]:
        """Label names (multilabel) or class names (multiclass)."""
        return list(self._table().label_names)

    @property
    def num_classes(self) -> int:
        """Number of labels (multilabel) or classes (multiclass)."""
        return len(self._table().label_names)
