"""Score a CSV of new patients with a deployable MedMIX model alone: no training rows, no
checkpoint, no feature cache. The inputs' columns, the categorical vocabularies and the image
pre-processing come from ``medmix.json`` (issue 26: scoring needed the training rows in the
manifest, and raw images gave probabilities off by up to 0.021)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midol.data.image_io import UnreadableImageError, load_image
from midol.data.patients import PatientTable, read_patient_table
from midol.data.transforms.eval import EvalTransform
from midol.fusion.export import MedMIXDeployable


def scoring_table(meta: dict[str, Any], manifest: str, root: str | None = None) -> PatientTable:
    """The patients of ``manifest`` read with the model's recorded inputs and vocabularies."""
    specs = meta.get("input_specs")
    if not specs:
        raise ValueError("this MedMIX export records no input columns (written before midol 0.2): "
                         "export it again from its checkpoint")
    vocabularies = {i["name"]: i["vocab"] for i in meta["structure"]["inputs"] if i["kind"] == "tabular"}
    return read_patient_table(manifest, specs["inputs"], meta["label_names"], task=meta["structure"]["task"],
                              id_column=specs.get("id_column", "patient_id"), root=root,
                              vocabularies=vocabularies, labels=False)


def _image_features(model: MedMIXDeployable, modality: str, files: Sequence[str | None],
                    sizes: Sequence[int], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per expert: B x D features of the files (zeros where unreadable), and the readable mask."""
    ok = torch.zeros(len(files), dtype=torch.bool)
    images: list[np.ndarray | None] = []
    for i, f in enumerate(files):
        try:
            images.append(load_image(f) if f else None)
            ok[i] = f is not None
        except UnreadableImageError:
            images.append(None)
    out = []
    experts: Any = model.experts[modality]
    for expert, size in zip(experts, sizes, strict=True):
        transform = EvalTransform(size)
        batch = torch.zeros(len(files), 3, size, size, dtype=torch.uint8)
        for i, image in enumerate(images):
            if image is not None:
                batch[i] = transform(image)
        with torch.no_grad():
            feats = expert(model.normalizer(batch.to(device))).float()
        out.append(feats)
    return out, ok


@torch.no_grad()
def score_patients(model: MedMIXDeployable, meta: dict[str, Any], table: PatientTable,
                   batch_size: int = 32, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N x labels; sigmoid for multi-label, softmax for multi-class) and the
    N x inputs mask of what each patient had (present and readable)."""
    device = torch.device(device)
    model = model.to(device).eval()
    sizes = meta["preprocessing"]["image_sizes"]
    probs, masks = [], []
    for start in range(0, len(table), batch_size):
        rows = np.arange(start, min(start + batch_size, len(table)))
        present = torch.as_tensor(table.present[rows], dtype=torch.bool)
        inputs: dict[str, Any] = {}
        for m, spec in enumerate(table.inputs):
            if spec.kind == "image":
                modality = spec.modality or spec.name
                files = [table.image_files(spec.name)[r] for r in rows]
                feats, ok = _image_features(model, modality, files, sizes[modality], device)
                present[:, m] &= ok
                inputs[spec.name] = feats
            elif spec.kind == "tabular":
                arrays = table.tabular(spec.name)
                inputs[spec.name] = {
                    "numeric": torch.as_tensor(arrays.numeric[rows]).to(device),
                    "numeric_present": torch.as_tensor(arrays.numeric_present[rows]).to(device),
                    "categorical": torch.as_tensor(arrays.categorical[rows]).to(device)}
            else:
                inputs[spec.name] = torch.as_tensor(table.embeddings(spec.name)[rows]).float().to(device)
        logits = model.net(inputs, present.to(device)).logits.float()
        p = logits.sigmoid() if table.task == "multilabel" else logits.softmax(-1)
        probs.append(p.cpu().numpy())
        masks.append(present.numpy())
    return np.concatenate(probs), np.concatenate(masks)


def load_for_scoring(path: str | Path) -> tuple[MedMIXDeployable, dict[str, Any]]:
    """The deployable model and its ``medmix.json``."""
    import json

    from midol.fusion.export import load_deployable

    path = Path(path)
    weights = path / "medmix.safetensors" if path.is_dir() else path
    return load_deployable(weights), json.loads(weights.with_suffix(".json").read_text())
