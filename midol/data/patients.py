"""Patient manifests for MedMIX: one CSV row per patient, with named inputs of three kinds.

An input is an ``image`` (a path column), ``tabular`` (numeric and categorical columns) or an
``embedding`` (a column with the path of a ``.npy`` or ``.safetensors`` vector, e.g. a report
embedded by any text model). Any input may be absent for a patient: absence is the boolean
``present`` mask, never a zero image or a zero vector (design: ``docs/papers/medmix.md``,
'Inputs and absence').

:func:`read_patient_table` reads a manifest once, with every split, into a
:class:`PatientTable`; the Lightning side is :mod:`midol.data.patient_datamodule`.

* image: an empty cell is absent; a listed file that does not exist is absent too, with one
  :class:`~midol.data.image_io.UnreadableImageWarning` per input (count in
  ``table.missing_files``).
* tabular: missing tokens (empty, ``nan``, ``NA``, ``null``, ``None``, any case) are missing;
  numeric cells must otherwise be finite floats. Categorical codes index the sorted values
  seen in the *training* split; a value seen only in val/test becomes
  :data:`~midol.models.fusion.MISSING_CODE`. The input is absent when all its columns are
  missing.
* embedding: an empty cell is absent; every present vector has the same length D; a missing
  file is absent with a warning, as for images.

Patients without any present input are dropped with one warning.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from midol.data.image_io import UnreadableImageWarning
from midol.data.readers import csv_base, read_csv_rows
from midol.data.splits import seeded_split
from midol.models.fusion import MISSING_CODE

Kind = Literal["image", "tabular", "embedding"]
Task = Literal["multilabel", "multiclass"]
KINDS: tuple[str, ...] = ("image", "tabular", "embedding")
STAGES: tuple[str, ...] = ("train", "val", "test")
MISSING_TOKENS: frozenset[str] = frozenset({"", "nan", "na", "null", "none"})
DEFAULT_SPLIT_NAMES: dict[str, str] = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
}
EMBEDDING_SUFFIXES: tuple[str, ...] = (".npy", ".safetensors")


@dataclass
class InputSpec:
    """One named input of a patient.

    Attributes:
        name: The input's name (unique within a manifest), e.g. ``left_fundus``.
        kind: ``image``, ``tabular`` or ``embedding``.
        column: image: the column with the image path; embedding: the column with the path of
            a ``.npy`` or ``.safetensors`` file holding one vector (paths relative to ``root``).
        numeric: tabular: numeric columns.
        categorical: tabular: categorical columns.
        modality: image: inputs with the same modality share experts (e.g. both eyes:
            ``fundus``); default: the input's name.
    """

    name: str
    kind: Kind
    column: str | None = None
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    modality: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"input name must be a non-empty string, got {self.name!r}")
        where = f"input {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r} (image, tabular or embedding)")
        self.numeric, self.categorical = list(self.numeric), list(self.categorical)
        if self.kind == "tabular":
            if self.column is not None:
                raise ValueError(f"{where}: a tabular input takes numeric/categorical columns, "
                                 "not 'column'")
            if not self.numeric and not self.categorical:
                raise ValueError(f"{where}: a tabular input needs at least one numeric or "
                                 "categorical column")
            columns = self.numeric + self.categorical
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:
                raise ValueError(f"{where}: column(s) {twice} listed more than once")
        else:
            if not self.column:
                raise ValueError(f"{where}: an {self.kind} input needs 'column'")
            if self.numeric or self.categorical:
                raise ValueError(f"{where}: numeric/categorical apply to tabular inputs only")
        if self.kind == "image":
            self.modality = self.modality or self.name
        elif self.modality is not None:
            raise ValueError(f"{where}: 'modality' applies to image inputs only")

    @property
    def columns(self) -> list[str]:
        """The CSV columns this input reads."""
        return [self.column] if self.column else self.numeric + self.categorical

    @classmethod
    def from_any(cls, spec: InputSpec | dict[str, Any]) -> InputSpec:
        """``spec`` itself, or ``InputSpec(**spec)``; an unknown key is a ``ValueError``."""
        if isinstance(spec, InputSpec):
            return spec
        if not isinstance(spec, dict):
            raise TypeError(f"an input must be an InputSpec or a dict, got {type(spec).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            raise ValueError(f"input {spec.get('name')!r}: unknown key(s) {unknown} "
                             f"(allowed: {', '.join(allowed)})")
        missing = [k for k in ("name", "kind") if k not in spec]
        if missing:
            raise ValueError(f"input {spec.get('name')!r}: missing key(s) {missing}")
        return cls(**spec)


def check_inputs(inputs: Sequence[InputSpec | dict[str, Any]]) -> list[InputSpec]:
    """The inputs as :class:`InputSpec`; at least one, names unique."""
    specs = [InputSpec.from_any(s) for s in inputs]
    if not specs:
        raise ValueError("a patient manifest needs at least one input")
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"input names must be unique: {twice} given more than once")
    return specs


@dataclass
class TabularArrays:
    """The columns of one tabular input for all patients of a table.

    Attributes:
        numeric: ``N x n`` float32, NaN where missing.
        numeric_present: ``N x n`` bool.
        categorical: ``N x c`` int64 codes, ``MISSING_CODE`` (-1) where missing or where the
            value was never seen in the training split.
        vocab: per categorical column, the sorted values seen in the training split
            (code = index).
    """

    numeric: np.ndarray
    numeric_present: np.ndarray
    categorical: np.ndarray
    vocab: list[list[str]]

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) for v in self.vocab]

    def subset(self, idx: np.ndarray) -> TabularArrays:
        return TabularArrays(self.numeric[idx], self.numeric_present[idx],
                             self.categorical[idx], self.vocab)


class PatientTable:
    """All patients of a manifest, with every split; built by :func:`read_patient_table`.

    Attributes:
        inputs / input_names: the inputs in spec order (the columns of ``present``).
        patient_ids: one per row (the id column, or 1-based data-row numbers as strings).
        present: ``N x M`` bool, natural presence.
        split: ``N`` array of ``'train'`` / ``'val'`` / ``'test'``.
        task / label_names / targets: multilabel: ``N x L`` float32 0/1; multiclass: ``N``
            int64 ids into ``label_names``.
        missing_files: per image/embedding input, how many listed files did not exist.
        manifest: the CSV's path.
    """

    def __init__(
        self,
        manifest: str,
        inputs: list[InputSpec],
        patient_ids: list[str],
        present: np.ndarray,
        split: np.ndarray,
        task: Task,
        label_names: list[str],
        targets: np.ndarray,
        images: dict[str, list[str | None]],
        tabulars: dict[str, TabularArrays],
        embeddings: dict[str, np.ndarray],
        missing_files: dict[str, int],
    ) -> None:
        self.manifest = manifest
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.patient_ids = patient_ids
        self.present = present
        self.split = split
        self.task: Task = task
        self.label_names = label_names
        self.targets = targets
        self._images = images
        self._tabulars = tabulars
        self._embeddings = embeddings
        self.missing_files = missing_files

    def __len__(self) -> int:
        return len(self.patient_ids)

    def spec(self, name: str) -> InputSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(f"no input {name!r} (inputs: {', '.join(self.input_names)})")

    def _of_kind(self, name: str, kind: str, store: dict[str, Any]) -> Any:
        if name not in store:
            names = [s.name for s in self.inputs if s.kind == kind]
            raise KeyError(f"no {kind} input {name!r} "
                           f"({kind} inputs: {', '.join(names) or 'none'})")
        return store[name]

    def image_files(self, name: str) -> list[str | None]:
        """Absolute image paths of input ``name``, None where absent."""
        return list(self._of_kind(name, "image", self._images))

    def rows(self, stage: str) -> np.ndarray:
        """Sorted row indices of the ``train`` / ``val`` / ``test`` patients."""
        if stage not in STAGES:
            raise ValueError(f"unknown split {stage!r} (train, val or test)")
        return np.flatnonzero(self.split == stage)

    def tabular(self, name: str) -> TabularArrays:
        return self._of_kind(name, "tabular", self._tabulars)

    def embeddings(self, name: str) -> np.ndarray:
        """``N x D`` float32, NaN rows where absent."""
        return self._of_kind(name, "embedding", self._embeddings)

    def modalities(self) -> dict[str, list[str]]:
        """Modality -> the image inputs sharing it (in spec order)."""
        out: dict[str, list[str]] = {}
        for s in self.inputs:
            if s.kind == "image":
                out.setdefault(s.modality or s.name, []).append(s.name)
        return out

    def summary(self) -> str:
        """One line per split: patients, and per input how many have it."""
        lines = []
        for stage in STAGES:
            idx = self.rows(stage)
            if not len(idx):
                continue
            counts = self.present[idx].sum(axis=0)
            per_input = ", ".join(f"{n} {int(c)}"
                                  for n, c in zip(self.input_names, counts, strict=True))
            lines.append(f"{stage}: {len(idx)} patients; present: {per_input}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- reading helpers
def _cell(row: Mapping[Any, Any], column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING_TOKENS


class _Where:
    """Names a row in errors: ``file: row 3 (patient 13), column 'age'``."""

    def __init__(self, manifest: str, ids: list[str], have_ids: bool) -> None:
        self.manifest, self.ids, self.have_ids = manifest, ids, have_ids

    def __call__(self, n: int, column: str | None = None) -> str:
        who = f" (patient {self.ids[n]})" if self.have_ids else ""
        col = f", column {column!r}" if column else ""
        return f"{self.manifest}: row {n + 1}{who}{col}"


def _warn_missing_files(manifest: str, name: str, missing: list[str]) -> None:
    if missing:
        warnings.warn(
            f"{manifest}: input {name!r}: {len(missing)} listed file(s) do not exist, treated "
            f"as absent, e.g. {', '.join(missing[:3])}",
            UnreadableImageWarning, stacklevel=4,
        )


def _read_images(rows: list[dict], spec: InputSpec, base: str, manifest: str
                 ) -> tuple[list[str | None], np.ndarray, int]:
    assert spec.column is not None
    files: list[str | None] = []
    missing: list[str] = []
    for row in rows:
        cell = _cell(row, spec.column)
        if not cell:
            files.append(None)
            continue
        path = os.path.abspath(os.path.join(base, os.path.expanduser(cell)))
        if not os.path.isfile(path):
            missing.append(path)
            files.append(None)
        else:
            files.append(path)
    _warn_missing_files(manifest, spec.name, missing)
    return files, np.array([f is not None for f in files], dtype=bool), len(missing)


def _load_vector(path: str, what: str) -> np.ndarray:
    lower = path.lower()
    try:
        if lower.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise ValueError(f"{what}: {path} must hold exactly one tensor, holds "
                                 f"{len(tensors)} ({', '.join(sorted(tensors)) or 'none'})")
            arr = next(iter(tensors.values()))
    except ValueError as err:
        if str(err).startswith(what):
            raise
        raise ValueError(f"{what}: cannot read {path} ({err})") from err
    except Exception as err:  # OSError, safetensors' own errors for truncated files
        raise ValueError(f"{what}: cannot read {path} ({type(err).__name__}: {err})") from err
    vec = np.asarray(arr).reshape(-1)
    if vec.dtype.kind not in "fiub":
        raise ValueError(f"{what}: {path} holds {vec.dtype} values, not numbers")
    vec = vec.astype(np.float32)
    if not vec.size:
        raise ValueError(f"{what}: {path} holds an empty vector")
    if not np.isfinite(vec).all():
        raise ValueError(f"{what}: {path} holds NaN or inf (absence is an empty cell)")
    return vec


def _read_embeddings(rows: list[dict], spec: InputSpec, base: str, where: _Where
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    assert spec.column is not None
    vectors: list[np.ndarray | None] = []
    missing: list[str] = []
    dim: int | None = None
    first = -1
    for n, row in enumerate(rows):
        cell = _cell(row, spec.column)
        if not cell:
            vectors.append(None)
            continue
        what = where(n, spec.column)
        path = os.path.abspath(os.path.join(base, os.path.expanduser(cell)))
        if not path.lower().endswith(EMBEDDING_SUFFIXES):
            raise ValueError(f"{what}: embedding file {cell!r} must end with .npy or .safetensors")
        if not os.path.isfile(path):
            missing.append(path)
            vectors.append(None)
            continue
        vec = _load_vector(path, what)
        if dim is None:
            dim, first = vec.size, n
        elif vec.size != dim:
            raise ValueError(f"{what}: embedding has {vec.size} values but {where(first)} has "
                             f"{dim}; every vector of input {spec.name!r} needs the same length")
        vectors.append(vec)
    _warn_missing_files(where.manifest, spec.name, missing)
    if dim is None:
        raise ValueError(f"{where.manifest}: embedding input {spec.name!r} has no readable "
                         "vector, so its dimension is unknown")
    out = np.full((len(rows), dim), np.nan, dtype=np.float32)
    for n, v in enumerate(vectors):
        if v is not None:
            out[n] = v
    return out, np.array([v is not None for v in vectors], dtype=bool), len(missing)


def _parse_numeric(rows: list[dict], columns: list[str], where: _Where) -> np.ndarray:
    out = np.full((len(rows), len(columns)), np.nan, dtype=np.float32)
    for n, row in enumerate(rows):
        for j, column in enumerate(columns):
            cell = _cell(row, column)
            if _is_missing(cell):
                continue
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{where(n, column)}: {cell!r} is not a number (missing values: "
                                 "an empty cell, nan, NA, null or None)") from None
            if not np.isfinite(value):
                raise ValueError(f"{where(n, column)}: {cell!r} is not a finite number")
            out[n, j] = value
    return out


def _raw_categorical(rows: list[dict], columns: list[str]) -> list[list[str | None]]:
    return [[None if _is_missing(c) else c for c in (_cell(row, col) for col in columns)]
            for row in rows]


def _encode_categorical(raw: list[list[str | None]], columns: list[str], train: np.ndarray,
                        manifest: str, name: str) -> tuple[np.ndarray, list[list[str]]]:
    codes = np.full((len(raw), len(columns)), MISSING_CODE, dtype=np.int64)
    vocab: list[list[str]] = []
    for j, column in enumerate(columns):
        values = sorted({v for n in np.flatnonzero(train) if (v := raw[n][j]) is not None})
        if not values:
            raise ValueError(f"{manifest}: input {name!r}: categorical column {column!r} has no "
                             "value in the training split")
        index = {v: i for i, v in enumerate(values)}
        unseen: list[str] = []
        for n, row in enumerate(raw):
            value = row[j]
            if value is None:
                continue
            if value in index:
                codes[n, j] = index[value]
            else:
                unseen.append(value)
        if unseen:
            warnings.warn(
                f"{manifest}: input {name!r}: column {column!r}: {len(unseen)} value(s) never "
                f"seen in the training split, coded as missing ({MISSING_CODE}), e.g. "
                f"{sorted(set(unseen))[:3]}",
                stacklevel=3,
            )
        vocab.append(values)
    return codes, vocab


def _encode_with(raw: list[list[str | None]], columns: list[str], vocab: list[list[str]],
                 manifest: str, name: str) -> np.ndarray:
    """Codes of ``raw`` in a recorded vocabulary (unseen values: missing, warned once)."""
    if len(vocab) != len(columns):
        raise ValueError(f"{manifest}: input {name!r}: {len(columns)} categorical columns but the "
                         f"model recorded {len(vocab)} vocabularies")
    codes = np.full((len(raw), len(columns)), MISSING_CODE, dtype=np.int64)
    for j, column in enumerate(columns):
        index = {v: i for i, v in enumerate(vocab[j])}
        unseen = sorted({v for row in raw if (v := row[j]) is not None and v not in index})
        for n, row in enumerate(raw):
            value = row[j]
            if value is not None and value in index:
                codes[n, j] = index[value]
        if unseen:
            warnings.warn(f"{manifest}: input {name!r}: column {column!r}: value(s) the model never "
                          f"saw, coded as missing ({MISSING_CODE}), e.g. {unseen[:3]}", stacklevel=3)
    return codes


def _targets(rows: list[dict], label_columns: list[str], task: Task, where: _Where
             ) -> tuple[np.ndarray, list[str]]:
    if task == "multilabel":
        values = {"0": 0.0, "0.0": 0.0, "1": 1.0, "1.0": 1.0}
        out = np.zeros((len(rows), len(label_columns)), dtype=np.float32)
        for n, row in enumerate(rows):
            for j, column in enumerate(label_columns):
                cell = _cell(row, column)
                if cell not in values:
                    raise ValueError(f"{where(n, column)}: multi-label value {cell!r} "
                                     "is not 0 or 1")
                out[n, j] = values[cell]
        return out, list(label_columns)
    column = label_columns[0]
    raw = [_cell(row, column) for row in rows]
    for n, cell in enumerate(raw):
        if not cell:
            raise ValueError(f"{where(n, column)}: empty class label")
    try:
        ints = [int(c) for c in raw]
    except ValueError:
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[c] for c in raw], dtype=np.int64), classes
    ids = sorted(set(ints))
    index_int = {c: i for i, c in enumerate(ids)}
    return np.array([index_int[c] for c in ints], dtype=np.int64), [str(c) for c in ids]


def _splits(rows: list[dict], split_column: str, names: dict[str, str], where: _Where
            ) -> np.ndarray:
    out = []
    for n, row in enumerate(rows):
        value = _cell(row, split_column)
        if value not in names:
            raise ValueError(f"{where(n, split_column)}: unknown split {value!r} (known: "
                             f"{', '.join(sorted(names))})")
        out.append(names[value])
    return np.array(out, dtype="<U5")


def _seeded_splits(targets: np.ndarray, task: Task, val_fraction: float, test_fraction: float,
                   seed: int) -> np.ndarray:
    strata = np.asarray(targets if task == "multiclass" else (targets > 0).any(axis=1), np.int64)
    _, val_idx, test_idx = seeded_split(len(targets), [val_fraction, test_fraction], seed, strata)
    out = np.full(len(targets), "train", dtype="<U5")
    out[val_idx] = "val"
    out[test_idx] = "test"
    return out


# ------------------------------------------------------------------------------------ reader
def read_patient_table(
    manifest: str,
    inputs: Sequence[InputSpec | dict[str, Any]],
    label_columns: Sequence[str],
    task: str | None = None,
    id_column: str = "patient_id",
    split_column: str | None = "split",
    split_names: dict[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    root: str | None = None,
    vocabularies: dict[str, list[list[str]]] | None = None,
    labels: bool = True,
) -> PatientTable:
    """Read a patient manifest (one CSV row per patient) with all its splits.

    Args:
        manifest: The CSV file.
        inputs: :class:`InputSpec` or dicts of its fields, in the order of ``present``'s columns.
        label_columns: 0/1 columns (multilabel) or one class column (multiclass: class names
            or integer ids; classes sorted, integers numerically).
        task: ``multilabel`` or ``multiclass``; default: multilabel with more than one label
            column, else multiclass.
        id_column: Patient ids (default ``patient_id``); if absent, 1-based row numbers.
        split_column: The split of each row, mapped through ``split_names`` (default:
            train/val/valid/validation/test); None, or a column absent from the CSV: a seeded
            split of all patients with ``val_fraction``/``test_fraction``/``split_seed``
            (stratified by class, or for multilabel by "has any positive label").
        root: Base folder of relative paths (default: the CSV's folder).
        vocabularies: per tabular input, the categories of each categorical column as a model
            recorded them (new patients are scored with the training vocabulary; no training
            rows are needed then). Default: learnt from the training split.
        labels: False for patients to score: the label columns need not exist (targets are
            zeros, ``label_columns`` are then the model's label names), every row is "test".
    """
    specs = check_inputs(inputs)
    label_columns = list(label_columns)
    if not label_columns:
        raise ValueError("label_columns must name at least one column")
    if task is None:
        task = "multilabel" if len(label_columns) > 1 else "multiclass"
    if task not in ("multilabel", "multiclass"):
        raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
    if task == "multiclass" and len(label_columns) != 1:
        raise ValueError(f"multiclass needs exactly one label column, got {label_columns}")
    input_columns = {c for s in specs for c in s.columns}
    clash = sorted(input_columns & set(label_columns))
    if clash:
        raise ValueError(f"column(s) {clash} are both an input and a label")
    required = list(dict.fromkeys([c for s in specs for c in s.columns] + (label_columns if labels else [])))
    rows = read_csv_rows(manifest, required)
    header = set(rows[0].keys())
    base = csv_base(manifest, root)

    have_ids = id_column in header
    ids = ([_cell(r, id_column) for r in rows] if have_ids
           else [str(n + 1) for n in range(len(rows))])
    where = _Where(manifest, ids, have_ids)
    if have_ids:
        seen: dict[str, int] = {}
        for n, pid in enumerate(ids):
            if not pid:
                raise ValueError(f"{where(n, id_column)}: empty patient id")
            if pid in seen:
                raise ValueError(f"{where(n, id_column)}: patient id {pid!r} repeats row "
                                 f"{seen[pid] + 1} (one row per patient)")
            seen[pid] = n

    if labels:
        targets, label_names = _targets(rows, label_columns, task, where)  # type: ignore[arg-type]
    else:
        label_names = list(label_columns)
        targets = (np.zeros((len(rows), len(label_names)), dtype=np.float32) if task == "multilabel"
                   else np.zeros(len(rows), dtype=np.int64))

    present = np.zeros((len(rows), len(specs)), dtype=bool)
    images: dict[str, list[str | None]] = {}
    embeddings: dict[str, np.ndarray] = {}
    numerics: dict[str, np.ndarray] = {}
    categoricals: dict[str, list[list[str | None]]] = {}
    missing_files: dict[str, int] = {}
    for m, spec in enumerate(specs):
        if spec.kind == "image":
            images[spec.name], present[:, m], missing_files[spec.name] = _read_images(
                rows, spec, base, manifest)
        elif spec.kind == "embedding":
            embeddings[spec.name], present[:, m], missing_files[spec.name] = _read_embeddings(
                rows, spec, base, where)
        else:
            numerics[spec.name] = _parse_numeric(rows, spec.numeric, where)
            categoricals[spec.name] = _raw_categorical(rows, spec.categorical)
            has_num = ~np.isnan(numerics[spec.name]).all(axis=1)
            has_cat = np.array([any(v is not None for v in r) for r in categoricals[spec.name]],
                               dtype=bool)
            present[:, m] = has_num | has_cat

    if not labels:
        split = np.full(len(rows), "test", dtype="<U5")
    elif split_column is not None and split_column in header:
        split = _splits(rows, split_column, split_names or DEFAULT_SPLIT_NAMES, where)
    else:
        split = None

    keep = present.any(axis=1)
    if not keep.all():
        dropped = [ids[n] for n in np.flatnonzero(~keep)]
        warnings.warn(
            f"{manifest}: {len(dropped)} patient(s) have no present input and are dropped, "
            f"e.g. {', '.join(dropped[:5])}",
            stacklevel=2,
        )
        if not keep.any():
            raise ValueError(f"{manifest}: no patient has any present input")
    kept = np.flatnonzero(keep)
    rows = [rows[n] for n in kept]
    ids = [ids[n] for n in kept]
    present, targets = present[kept], targets[kept]
    images = {k: [v[n] for n in kept] for k, v in images.items()}
    embeddings = {k: v[kept] for k, v in embeddings.items()}
    numerics = {k: v[kept] for k, v in numerics.items()}
    categoricals = {k: [v[n] for n in kept] for k, v in categoricals.items()}

    if split is None:
        split = _seeded_splits(targets, task, val_fraction, test_fraction, split_seed)  # type: ignore[arg-type]
    else:
        split = split[kept]
    train = split == "train"
    if not train.any() and vocabularies is None:
        raise ValueError(f"{manifest}: the training split is empty")

    tabulars: dict[str, TabularArrays] = {}
    for spec in specs:
        if spec.kind != "tabular":
            continue
        numeric = numerics[spec.name]
        if vocabularies is not None:
            vocab = [list(v) for v in vocabularies[spec.name]]
            codes = _encode_with(categoricals[spec.name], spec.categorical, vocab, manifest, spec.name)
        else:
            codes, vocab = _encode_categorical(categoricals[spec.name], spec.categorical, train,
                                               manifest, spec.name)
        tabulars[spec.name] = TabularArrays(numeric, ~np.isnan(numeric), codes, vocab)

    return PatientTable(
        manifest=manifest, inputs=specs, patient_ids=ids, present=present, split=split,
        task=task, label_names=label_names, targets=targets,  # type: ignore[arg-type]
        images=images, tabulars=tabulars, embeddings=embeddings, missing_files=missing_files,
    )
