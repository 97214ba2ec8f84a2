"""Evaluation suites: YAML lists of labelled image tasks, read through midol's own readers.

A suite file::

    name: shared-data
    data_root: ../../../shared/data      # relative paths of sources start here (default: the
                                         # suite file's folder; ``midol eval --data_root`` wins)
    image_size: 64                       # default input side of every task
    tasks:
      - name: pneumoniamnist
        modality: xray
        type: binary                     # binary | multiclass | ordinal | multilabel
        train: {path: medmnist/pneumoniamnist.npz, split: train}
        val: {path: medmnist/pneumoniamnist.npz, split: val}
        test: {path: medmnist/pneumoniamnist.npz, split: test}
        split_rule: official MedMNIST v2 splits

A source is a :class:`~midol.data.labelled.LabelledSource` (class folders, CSV manifests,
MedMNIST ``.npz``). A split that is not given is carved from ``train`` with ``split_seed``
(``val_fraction``, ``test_fraction``), stratified by class and, with ``group_column``, by
patient: no patient is ever on two sides.

A group task (``label_level: group``) labels groups of images (a patient's two eyes, a volume's
slices), named by ``group_column``; it is scored with one prediction per group
(:mod:`midol.evaluation.group_probe`). Its images come from a per-image CSV whose rows carry
their group's label, or from a patient manifest with one row per group and its images in
``image_columns`` (an empty cell is an absent image)::

      - name: odir_patient_normal
        type: binary
        label_level: group
        group_column: patient_id
        image_columns: [left_image, right_image]
        train: {path: fundus/odir_patients/patients.csv, split: train, label_columns: [N]}
        test: {path: fundus/odir_patients/patients.csv, split: test, label_columns: [N]}
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from midol.data.labelled import LabelledDataModule, LabelledSource, LabelledSplit
from midol.data.patients import DEFAULT_SPLIT_NAMES, read_patient_table
from midol.data.readers import ImageList, read_csv_rows
from midol.data.splits import seeded_split
from midol.errors import UsageError
from midol.evaluation.group_probe import GroupSplit, group_split

TaskType = Literal["binary", "multiclass", "ordinal", "multilabel"]
TASK_TYPES: tuple[str, ...] = ("binary", "multiclass", "ordinal", "multilabel")
SPLITS = ("train", "val", "test")
LABEL_LEVELS: tuple[str, ...] = ("image", "group")


class SuiteError(UsageError):
    """A suite file or one of its tasks is malformed (one-line message naming the task)."""


@dataclass
class TaskSpec:
    """One labelled task of a suite.

    Attributes:
        name: Unique name in the suite (report rows, cache keys).
        modality: Imaging modality (report grouping only).
        type: ``binary`` (two classes), ``multiclass``, ``ordinal`` (multiclass whose classes
            are ordered, e.g. DR grade: kappa is quadratic-weighted) or ``multilabel``.
        train: The training source (a LabelledSource mapping: path, kind, split, ...).
        val: Validation source (selects the linear probe's regularisation); optional.
        test: Test source; when absent ``test_fraction`` of ``train`` is carved off.
        val_fraction: Share of ``train`` carved off as validation when ``val`` is absent (0: the
            linear probe uses inner cross-validation instead).
        test_fraction: Share of ``train`` carved off as test when ``test`` is absent.
        split_seed: Seed of the carving (fixed per task, never per backbone or draw).
        split_rule: The dataset's split rule in words (written into the report).
        split_method: How a task with a ``group_column`` is carved: ``patients`` (default:
            ``seeded_split`` over the unique groups, a group's stratum the class of its first
            image) or ``stratified_group_kfold`` (scikit-learn's ``StratifiedGroupKFold``, one
            fold of ``round(1 / fraction)`` as each carved part: image shares and class shares
            much closer to the fraction when groups differ in size, measured in
            experiments/results/library_choices_2026-12-08.md). The default stays until the
            eval study is re-run with the new one (its committed numbers were carved by
            ``patients``).
        classes: Class names in id order (default: sorted folder names / label values).
        group_column: CSV column naming each image's patient (or other group): carving and
            few-shot draws never put one group on two sides.
        group_regex: Optional regular expression whose first group extracts the patient id from
            ``group_column`` (e.g. ``^(\\d+)_`` for NIH image indices).
        image_size: Input side for this task (default: the suite's; a backbone that records
            its own size is fed at that size, with a warning when they differ).
        uncertain_label: Multilabel cells -1/empty: ``error``, ``zero`` or ``one``.
        label_level: ``image`` (one label and one prediction per image) or ``group`` (one per
            ``group_column`` value: the group's images are pooled, every image of a group must
            carry the group's label).
        image_columns: A group task read from a patient manifest (one CSV row per group, the id
            in ``group_column``): the columns holding the group's image paths; empty cells are
            absent images (read by :func:`midol.data.patients.read_patient_table`).
    """

    name: str
    type: str
    train: dict[str, Any]
    modality: str = "unknown"
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0
    split_rule: str = ""
    split_method: str = "patients"
    classes: list[str] | None = None
    group_column: str | None = None
    group_regex: str | None = None
    image_size: int | None = None
    uncertain_label: str = "error"
    label_level: str = "image"
    image_columns: list[str] | None = None


@dataclass
class Suite:
    """A named list of tasks; ``data_root`` resolves relative source paths."""

    name: str
    tasks: list[TaskSpec]
    data_root: str
    image_size: int = 224
    description: str = ""
    path: str | None = None


@dataclass
class TaskData:
    """A task's images, targets and (optional) patient groups per split; a group task also
    has its groups per split (``group_splits``: ids, each image's group, one label each)."""

    spec: TaskSpec
    splits: dict[str, LabelledSplit]
    groups: dict[str, np.ndarray | None]
    class_names: list[str]
    num_classes: int
    notes: list[str] = field(default_factory=list)
    group_splits: dict[str, GroupSplit] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def group_level(self) -> bool:
        return self.spec.label_level == "group"


def load_suite(path: str | os.PathLike[str], data_root: str | None = None,
               only: list[str] | None = None) -> Suite:
    """Parse a suite file; ``only`` keeps the named tasks (in the suite's order)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise SuiteError(f"{path}: a suite is a mapping with a non-empty 'tasks' list")
    allowed = {"name", "tasks", "data_root", "image_size", "description", "skip_missing"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SuiteError(f"{path}: unknown suite key(s) {unknown}; allowed: {sorted(allowed)}")
    root = data_root if data_root is not None else raw.get("data_root")
    root = str((path.parent / os.path.expanduser(root)).resolve()) if root else str(path.parent.resolve())
    tasks = [_parse_task(t, f"{path} tasks[{i}]") for i, t in enumerate(raw["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SuiteError(f"{path}: task names must be unique, got {names}")
    if raw.get("skip_missing"):  # e.g. the MedMNIST+ suite: run the files a user has
        present = [t for t in tasks if os.path.exists(_source(t.train, root).path)]
        for t in tasks:
            if t not in present:
                warnings.warn(f"suite {path.name}: task {t.name!r} skipped: "
                              f"{_source(t.train, root).path} does not exist", UserWarning, stacklevel=2)
        if not present:
            raise SuiteError(f"{path}: none of the suite's files exist under {root}")
        tasks = present
        names = [t.name for t in tasks]
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise SuiteError(f"{path}: no task(s) {missing}; the suite has {names}")
        tasks = [t for t in tasks if t.name in only]
    size = int(raw.get("image_size") or 224)
    return Suite(str(raw.get("name") or path.stem), tasks, root, size,
                 str(raw.get("description") or ""), str(path))


def _parse_task(value: Any, where: str) -> TaskSpec:
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: a task is a mapping (name, type, train, ...), got {value!r}")
    allowed = {f.name for f in fields(TaskSpec)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown task key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "type", "train"):
        if key not in value:
            raise SuiteError(f"{where}: every task needs {key!r}")
    spec = TaskSpec(**value)
    where = f"task {spec.name!r}"
    if spec.type not in TASK_TYPES:
        raise SuiteError(f"{where}: unknown task type {spec.type!r}; one of {', '.join(TASK_TYPES)}")
    source_keys = {f.name for f in fields(LabelledSource)}
    for split in SPLITS:
        src = getattr(spec, split)
        if src is None:
            continue
        if not isinstance(src, dict) or "path" not in src:
            raise SuiteError(f"{where}: {split} must be a mapping with a 'path'")
        bad = sorted(set(src) - source_keys)
        if bad:
            raise SuiteError(f"{where}: unknown {split} key(s) {bad}; allowed: {sorted(source_keys)}")
    if spec.split_method not in ("patients", "stratified_group_kfold"):
        raise SuiteError(f"{where}: split_method must be patients or stratified_group_kfold, "
                         f"got {spec.split_method!r}")
    for name in ("val_fraction", "test_fraction"):
        frac = float(getattr(spec, name))
        if not 0.0 <= frac < 1.0:
            raise SuiteError(f"{where}: {name} must be in [0, 1), got {frac}")
    if spec.test is None and not spec.test_fraction:
        raise SuiteError(f"{where}: give a test source or a test_fraction > 0")
    if spec.test is not None and spec.test_fraction:
        raise SuiteError(f"{where}: give either a test source or test_fraction, not both")
    if spec.val is not None and spec.val_fraction:
        raise SuiteError(f"{where}: give either a val source or val_fraction, not both")
    if spec.image_size is not None and int(spec.image_size) < 8:
        raise SuiteError(f"{where}: image_size must be >= 8, got {spec.image_size}")
    if spec.label_level not in LABEL_LEVELS:
        raise SuiteError(f"{where}: label_level must be one of {', '.join(LABEL_LEVELS)}, "
                         f"got {spec.label_level!r}")
    if spec.label_level == "group" and not spec.group_column:
        raise SuiteError(f"{where}: label_level group needs group_column (the column naming each "
                         "image's group)")
    if spec.image_columns is not None:
        if spec.label_level != "group":
            raise SuiteError(f"{where}: image_columns (one manifest row per group) needs "
                             "label_level: group")
        if (not isinstance(spec.image_columns, list) or not spec.image_columns
                or not all(isinstance(c, str) and c for c in spec.image_columns)):
            raise SuiteError(f"{where}: image_columns must be a non-empty list of column names")
        if spec.group_regex is not None:
            raise SuiteError(f"{where}: group_regex applies to per-image CSVs, not to image_columns")
        if spec.uncertain_label != "error":  # the patient-manifest reader takes 0/1 labels only
            raise SuiteError(f"{where}: uncertain_label applies to per-image CSVs, not to "
                             "image_columns (a patient manifest's labels are 0/1)")
    if spec.group_regex is not None:
        try:
            if re.compile(spec.group_regex).groups < 1:
                raise SuiteError(f"{where}: group_regex needs one capturing group")
        except re.error as err:
            raise SuiteError(f"{where}: group_regex {spec.group_regex!r} is invalid ({err})") from None
    return spec


def _source(spec: dict[str, Any], root: str) -> LabelledSource:
    src = dict(spec)
    path = os.path.expanduser(str(src["path"]))
    src["path"] = path if os.path.isabs(path) else os.path.join(root, path)
    if src.get("root") and not os.path.isabs(os.path.expanduser(src["root"])):
        src["root"] = os.path.join(root, os.path.expanduser(src["root"]))
    return LabelledSource(**src)


def _groups(spec: TaskSpec, src: LabelledSource, n: int) -> np.ndarray | None:
    """Patient id per item of a CSV source, in the reader's row order."""
    if spec.group_column is None:
        return None
    if src.resolved_kind() != "csv":
        raise SuiteError(f"task {spec.name!r}: group_column needs a CSV source, {src.path} is not one")
    rows = read_csv_rows(src.path, [src.path_column, spec.group_column], src.split_column, src.split)
    ids = [(r[spec.group_column] or "").strip() for r in rows]
    if spec.group_regex:
        pattern = re.compile(spec.group_regex)
        out = []
        for i, cell in enumerate(ids):
            m = pattern.search(cell)
            if m is None:
                raise SuiteError(f"task {spec.name!r}: {src.path} row {i + 2}: group_regex "
                                 f"{spec.group_regex!r} does not match {cell!r}")
            out.append(m.group(1))
        ids = out
    if len(ids) != n:
        raise SuiteError(f"task {spec.name!r}: {len(ids)} group ids for {n} images in {src.path}")
    if any(not g for g in ids):
        raise SuiteError(f"task {spec.name!r}: empty {spec.group_column!r} in {src.path}")
    return np.asarray(ids, dtype=object)


def _load_manifest(spec: TaskSpec, sources: dict[str, LabelledSource]
                   ) -> tuple[dict[str, LabelledSplit], dict[str, np.ndarray | None], list[str], int]:
    """A group task's images from a patient manifest (one row per group, ``image_columns``):
    every present image is an item carrying its group's id and label."""
    where = f"task {spec.name!r}"
    assert spec.image_columns is not None and spec.group_column is not None
    train = sources["train"]
    if {s.path for s in sources.values()} != {train.path} or any(
            s.label_columns != train.label_columns or s.split_column != train.split_column
            for s in sources.values()):
        raise SuiteError(f"{where}: with image_columns every split reads the same manifest "
                         "(path, label_columns, split_column); they differ")
    if train.resolved_kind() != "csv":
        raise SuiteError(f"{where}: image_columns needs a CSV manifest, {train.path} is not one")
    with_split = any(s.split is not None for s in sources.values())
    task = "multilabel" if spec.type == "multilabel" else "multiclass"
    inputs = [{"name": c, "kind": "image", "column": c, "modality": "image"} for c in spec.image_columns]
    try:
        if with_split:  # a missing split column must not fall back to read_patient_table's carve
            read_csv_rows(train.path, [train.split_column])
        table = read_patient_table(train.path, inputs, train.label_columns, task,
                                   id_column=spec.group_column,
                                   split_column=train.split_column if with_split else None,
                                   root=train.root)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise SuiteError(f"{where}: {err}") from None
    targets, class_names = table.targets, list(table.label_names)
    if task == "multiclass" and spec.classes is not None:
        index = {c: i for i, c in enumerate(spec.classes)}
        unknown = sorted(set(class_names) - set(index))
        if unknown:
            raise SuiteError(f"{where}: label(s) {unknown} are not among classes {spec.classes}")
        targets = np.array([index[class_names[t]] for t in targets], dtype=np.int64)
        class_names = list(spec.classes)
    files = {c: table.image_files(c) for c in spec.image_columns}
    splits: dict[str, LabelledSplit] = {}
    groups: dict[str, np.ndarray | None] = {}
    for k, src in sources.items():
        if src.split is None:
            rows = np.arange(len(table))
        elif src.split in DEFAULT_SPLIT_NAMES:
            rows = table.rows(DEFAULT_SPLIT_NAMES[src.split])
        else:
            raise SuiteError(f"{where}: {k} split {src.split!r} is not one of "
                             f"{', '.join(sorted(DEFAULT_SPLIT_NAMES))}")
        paths, items, ids = [], [], []
        for r in rows:
            for c in spec.image_columns:
                path = files[c][r]
                if path is not None:
                    paths.append(path)
                    items.append(r)
                    ids.append(table.patient_ids[r])
        if not paths:
            raise SuiteError(f"{where}: the {k} split ({src.split_column} = {src.split!r}) has no image")
        splits[k] = LabelledSplit(ImageList(train.path, paths=paths), targets[np.asarray(items)])
        groups[k] = np.asarray(ids, dtype=object)
    num_classes = len(class_names)
    return splits, groups, class_names, num_classes


def load_task(spec: TaskSpec, data_root: str) -> TaskData:
    """Read a task's splits (carving those not given) with a one-line error on bad input."""
    where = f"task {spec.name!r}"
    sources = {k: _source(getattr(spec, k), data_root) for k in SPLITS if getattr(spec, k) is not None}
    task: Literal["multiclass", "multilabel"] = "multilabel" if spec.type == "multilabel" else "multiclass"
    if spec.image_columns:
        splits, groups, class_names, num_classes = _load_manifest(spec, sources)
    else:
        dm = LabelledDataModule(train=sources["train"], val=sources.get("val"), test=sources.get("test"),
                                task=task, classes=spec.classes, image_size=spec.image_size or 224,
                                train_augment=False, uncertain_label=spec.uncertain_label,  # type: ignore[arg-type]
                                val_fraction=0.0, test_fraction=0.0, split_seed=spec.split_seed)
        try:
            dm.setup("fit")
        except (ValueError, FileNotFoundError, OSError) as err:
            raise SuiteError(f"{where}: {err}") from None
        splits = dict(dm.splits)
        groups = {k: _groups(spec, sources[k], len(splits[k])) for k in sources}
        class_names, num_classes = list(dm.classes or []), dm.num_classes
    fractions = {"val": 0.0 if "val" in splits else spec.val_fraction,
                 "test": 0.0 if "test" in splits else spec.test_fraction}
    if fractions["val"] or fractions["test"]:
        carved = _carve(splits["train"], groups["train"], spec, fractions)
        full, full_groups = splits["train"], groups["train"]
        for k, idx in carved.items():
            splits[k] = full.subset(idx)
            groups[k] = full_groups[idx] if full_groups is not None else None
    for k, split in splits.items():
        if len(split) == 0:
            raise SuiteError(f"{where}: the {k} split is empty")
    if groups.get("test") is not None and groups.get("train") is not None:
        shared = set(groups["train"].tolist()) & set(groups["test"].tolist())  # type: ignore[union-attr]
        if shared:
            raise SuiteError(f"{where}: {len(shared)} patient(s) in both train and test, e.g. "
                             f"{sorted(shared)[:3]}")
    if spec.type == "binary" and num_classes != 2:
        raise SuiteError(f"{where}: type binary needs 2 classes, the data have {num_classes} "
                         f"({class_names}); use multiclass")
    if spec.type in ("multiclass", "ordinal") and num_classes < 2:
        raise SuiteError(f"{where}: needs at least 2 classes, got {num_classes}")
    group_splits: dict[str, GroupSplit] = {}
    if spec.label_level == "group":
        for k, split in splits.items():
            ids = groups.get(k)
            assert ids is not None  # label_level group requires group_column (checked on parse)
            try:
                group_splits[k] = group_split(ids, split.targets, f"{where}: {k} split")
            except ValueError as err:
                raise SuiteError(str(err)) from None
    return TaskData(spec, splits, groups, class_names, num_classes, group_splits=group_splits)


def _carve(train: LabelledSplit, groups: np.ndarray | None, spec: TaskSpec,
           fractions: dict[str, float]) -> dict[str, np.ndarray]:
    """Index arrays of train/val/test carved from ``train``: by patient when groups are
    known (a patient's stratum is the class of its first image), stratified by class."""
    strata = train.targets if spec.type != "multilabel" else None
    if groups is None:
        rest, val, test = seeded_split(len(train), [fractions["val"], fractions["test"]],
                                       spec.split_seed, strata)
        return {"train": rest, "val": val, "test": test} if fractions["val"] else {"train": rest, "test": test}
    if spec.split_method == "stratified_group_kfold":
        return _carve_group_kfold(strata, groups, spec, fractions)
    unique, first, inverse = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    group_strata = strata[first] if strata is not None else None
    g_rest, g_val, g_test = seeded_split(len(unique), [fractions["val"], fractions["test"]],
                                         spec.split_seed, group_strata)
    out = {"train": np.flatnonzero(np.isin(inverse, g_rest)),
           "test": np.flatnonzero(np.isin(inverse, g_test))}
    if fractions["val"]:
        out["val"] = np.flatnonzero(np.isin(inverse, g_val))
    return out


def _carve_group_kfold(strata: np.ndarray | None, groups: np.ndarray, spec: TaskSpec,
                       fractions: dict[str, float]) -> dict[str, np.ndarray]:
    """Test (then validation from the rest) as one fold of scikit-learn's
    ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds, seeded by ``split_seed``."""
    from sklearn.model_selection import StratifiedGroupKFold

    keys = groups.astype(str)
    y = np.asarray(strata) if strata is not None else np.zeros(len(keys), dtype=np.int64)

    def one_fold(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        folds = max(2, round(1 / fraction))
        present = len(np.unique(keys[rows]))
        if present < folds:
            raise SuiteError(f"task {spec.name!r}: {present} groups cannot make {folds} folds "
                             "(split_method: stratified_group_kfold)")
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        keep, take = next(splitter.split(rows, y[rows], keys[rows]))
        return rows[keep], rows[take]

    rest, test = one_fold(np.arange(len(keys)), fractions["test"], spec.split_seed)
    if not fractions["val"]:
        return {"train": rest, "test": test}
    share = fractions["val"] / (1 - fractions["test"])  # of what the test part left
    rest, val = one_fold(rest, share, spec.split_seed + 1)
    return {"train": rest, "val": val, "test": test}
