"""What MedMIX reads per patient row instead of pixels: every image input's frozen-expert
features, which inputs are available (present in the manifest and readable), the training-only
teachers' features and, optionally, a teacher's logits. Computed once through the
:class:`~midol.data.feature_cache.FeatureCache` (so a second fit reads them back) and looked up
by row in each batch."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from midol.data.feature_cache import CacheKey, FeatureCache
from midol.data.patient_datamodule import PatientDataset
from midol.data.transforms.eval import EvalTransform
from midol.fusion.experts import ExpertSpec, build_expert, encoder_key, feature_encoder


@dataclass
class FeatureSettings:
    """How features are computed on a cache miss."""

    cache_dir: str | Path
    batch_size: int = 64
    workers: int = 0
    device: torch.device | str = "cpu"
    key: CacheKey = "stat"

    def cache(self) -> FeatureCache:
        return FeatureCache(Path(self.cache_dir).expanduser(), self.key)


def cached_features(settings: FeatureSettings, spec: ExpertSpec, model: nn.Module | None, size: int,
                    files: Sequence[str | None], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """N x D features of ``files`` through ``spec`` (``model``, or built on a cache miss when
    None: a teacher) and the N readable flags."""
    encoders: list[Any] = [] if model is None else [feature_encoder(model)]

    def encode(images: torch.Tensor) -> torch.Tensor:
        if not encoders:
            encoders.append(feature_encoder(build_expert(spec)[0].to(settings.device)))
        return encoders[0](images)

    # A cache miss builds loaders and models, which draw from the global RNG: without the fork,
    # the fusion network's initialisation would depend on whether the cache was warm.
    with torch.random.fork_rng(devices=[]):
        result = settings.cache().features(encode, encoder_key(spec), list(files), EvalTransform(size),
                                           f"EvalTransform({size})", settings.batch_size,
                                           settings.workers, desc)
    return result.features, result.ok


@dataclass
class PatientFeatures:
    """Per patient row of a :class:`~midol.data.patients.PatientTable`."""

    experts: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # input -> [N x D_e]
    available: torch.Tensor | None = None  # N x M: present and readable
    teachers: dict[str, torch.Tensor] = field(default_factory=dict)  # input -> N x D_t
    teacher_ok: dict[str, torch.Tensor] = field(default_factory=dict)  # input -> N readable
    teacher_logits: torch.Tensor | None = None  # N x C

    def compute_experts(self, table: Any, settings: FeatureSettings,
                        specs: dict[str, list[ExpertSpec]], models: dict[str, Sequence[nn.Module]],
                        recipes: dict[str, list[dict[str, Any]]], keep: bool = True) -> None:
        """Every image input through every expert of its modality (``keep=False``: only the
        availability, when the experts are fine-tuned on pixels)."""
        available = torch.as_tensor(table.present, dtype=torch.bool).clone()
        self.experts = {}
        for m, spec in enumerate(table.inputs):
            if spec.kind != "image" or not keep:
                continue
            modality = spec.modality or spec.name
            files = table.image_files(spec.name)
            feats = []
            for expert_spec, model, recipe in zip(specs[modality], models[modality], recipes[modality],
                                                  strict=True):
                f, ok = cached_features(settings, expert_spec, model, recipe["image_size"], files,
                                        f"{spec.name} / {expert_spec.name}")
                feats.append(f)
                available[:, m] &= ok
            self.experts[spec.name] = feats
        self.available = available

    def compute_teachers(self, table: Any, settings: FeatureSettings,
                         teacher_specs: dict[str, ExpertSpec], teacher_dims: dict[str, int]) -> None:
        """The training-only teachers' features; ``teacher_dims`` (input -> width, -1 unknown)
        is filled in and checked against an earlier run's."""
        self.teachers, self.teacher_ok = {}, {}
        for spec in table.inputs:
            modality = spec.modality or spec.name
            if spec.kind != "image" or modality not in teacher_specs:
                continue
            teacher = teacher_specs[modality]
            size = teacher.image_size or int(teacher.backbone_kwargs.get("img_size", 0)) or None
            if size is None:
                raise ValueError(f"teachers.{modality}: set image_size (the teacher's input side)")
            f, ok = cached_features(settings, teacher, None, size, table.image_files(spec.name),
                                    f"{spec.name} / teacher {teacher.name}")
            self.teachers[spec.name], self.teacher_ok[spec.name] = f, ok
            if teacher_dims.get(spec.name, -1) not in (-1, f.shape[1]):
                raise ValueError(f"teacher width for {spec.name} changed from "
                                 f"{teacher_dims[spec.name]} to {f.shape[1]}")
            teacher_dims[spec.name] = int(f.shape[1])

    def read_teacher_logits(self, path: str | Path, table: Any) -> None:
        """A CSV of teacher logits: first column the patient id, one column per label."""
        path = str(Path(path).expanduser())
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            id_column = columns[0] if columns else ""
            missing = [n for n in table.label_names if n not in columns]
            if missing:
                raise ValueError(f"{path}: no column for label(s) {missing} (columns: {columns})")
            rows = {r[id_column]: [float(r[n]) for n in table.label_names] for r in reader}
        absent = [p for p in table.patient_ids if p not in rows]
        if absent:
            raise ValueError(f"{path}: no teacher logits for {len(absent)} patient(s), e.g. {absent[:3]}")
        self.teacher_logits = torch.tensor([rows[p] for p in table.patient_ids], dtype=torch.float32)

    # ------------------------------------------------------------------ lookups by row
    def presence(self, present: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A batch's presence mask with unreadable inputs switched off."""
        if self.available is None:
            raise RuntimeError("MedMIX: call setup()/attach(datamodule) before using the model")
        return present.bool() & self.available[index.cpu()].to(present.device)

    def expert_rows(self, name: str, index: torch.Tensor, device: torch.device | str) -> list[torch.Tensor]:
        return [f[index.cpu()].to(device) for f in self.experts[name]]

    def teacher_rows(self, name: str, index: torch.Tensor,
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = index.cpu()
        return self.teachers[name][rows].to(device), self.teacher_ok[name][rows].to(device)


def patient_batch(table: Any, rows: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The datamodule's batch for table ``rows`` without pixels (evaluation from the cache):
    the same items :class:`~midol.data.patient_datamodule.PatientDataset` gives a loader."""
    dataset = PatientDataset(table, rows.numpy(), load_images=False)
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    return _to_device(batch, device)


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value.to(device)
