"""The deployable MedMIX model: frozen experts + fusion network, without teacher or projections.

MedMIX (arXiv 2605.16639) establishes that its large teacher is used only in training, "with
no extra inference cost"; this module is where that holds by construction: the deployable
module has no teacher and no distillation projection, and :func:`inference_cost` measures
parameters and patients/s with and without the training-only path. Files:
``<out>/medmix.safetensors`` (weights) and ``<out>/medmix.json`` (recipe: network structure
and settings, expert recipes, input order, labels).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import midol
from midol.data.normalize import PixelNormalizer
from midol.fusion.experts import build_expert, build_from_recipe, expert_features
from midol.io.atomic import atomic_path, atomic_write_text
from midol.models.medmix_net import MedMIXNet

NET_SETTINGS = ("dim", "pooling", "expert_dropout", "fusion", "aux_heads", "aux_entropy_scores",
                "hidden_dim", "head_dropout")


class MedMIXDeployable(nn.Module):
    """uint8 images per input (+ tabular values, embeddings, presence) -> logits.

    Each image input is resized to each expert's own side (bicubic, antialiased) and
    normalised as in pre-training; absent inputs may hold anything (the presence mask rules).
    """

    def __init__(self, experts: nn.ModuleDict, recipes: dict[str, list[dict[str, Any]]],
                 net: MedMIXNet) -> None:
        super().__init__()
        self.experts = experts
        self.recipes = recipes
        self.net = net
        self.normalizer = PixelNormalizer()

    def features(self, modality: str, images: torch.Tensor) -> list[torch.Tensor]:
        experts: Any = self.experts[modality]  # a ModuleList
        return expert_features(self.normalizer(images), experts, self.recipes[modality])

    def forward(self, inputs: dict[str, Any], present: torch.Tensor) -> torch.Tensor:
        """``inputs[name]``: image -> uint8 B x 3 x H x W; tabular -> dict (``numeric``,
        ``numeric_present``, ``categorical``); embedding -> B x D. ``present``: B x M bool."""
        features: dict[str, Any] = {}
        for spec in self.net.inputs:
            name = spec["name"]
            if spec["kind"] == "image":
                features[name] = self.features(spec["modality"], inputs[name])
            else:
                features[name] = inputs[name]
        return self.net(features, present).logits


def export_deployable(method: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``medmix.safetensors`` + ``medmix.json`` for a set-up MedMIX method."""
    out = Path(out_dir)
    weights, meta_path = out / "medmix.safetensors", out / "medmix.json"
    if not overwrite and (weights.exists() or meta_path.exists()):
        raise FileExistsError(f"{weights} exists: pass --overwrite to replace it")
    model = method.deployable()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "kind": "medmix"})
    structure = {k: v for k, v in method.structure.items() if k not in ("expert_dims", "teacher_dims")}
    meta = {
        "kind": "medmix",
        "structure": structure,
        "settings": {k: method.hparams[k] for k in NET_SETTINGS},
        "expert_recipes": method.expert_recipes,
        "input_names": list(method.input_names),
        "label_names": list(method.structure["label_names"]),
        "input": "uint8 RGB images per image input (any size: resized per expert), "
                 "tabular values as in the manifest, a presence mask in input order",
        # what reproduces the checkpoint's probabilities on image files (the feature cache's
        # pre-processing): midol.fusion.score applies it; MedMIXDeployable.forward on tensors
        # resizes the whole image instead (close, not equal)
        "preprocessing": {
            "per_expert": "EvalTransform(image_size): shorter side resized to image_size "
                          "(bicubic; area when shrinking, albumentations SmallestMaxSize), centre "
                          "crop, uint8; then (x / 255 - ImageNet mean) / std",
            "image_sizes": {m: [int(r["image_size"]) for r in rs] for m, rs in method.expert_recipes.items()},
        },
        "input_specs": method.hparams.get("input_specs"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "midol_version": midol.__version__,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str) + "\n")
    return weights


def load_deployable(path: str | Path) -> MedMIXDeployable:
    """The model :func:`export_deployable` wrote (``medmix.safetensors`` or its folder), in
    eval mode; no teacher file is read or needed."""

    path = Path(path)
    if path.is_dir():
        path = path / "medmix.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("kind") != "medmix":
        raise ValueError(f"{path}: not a MedMIX export (kind {meta.get('kind')!r})")
    recipes = meta["expert_recipes"]
    structure = dict(meta["structure"])
    structure["expert_dims"] = {m: [int(r["dim"]) for r in rs] for m, rs in recipes.items()}
    experts = nn.ModuleDict({m: nn.ModuleList(build_from_recipe(r) for r in rs) for m, rs in recipes.items()})
    net = MedMIXNet(structure, **meta["settings"])
    model = MedMIXDeployable(experts, recipes, net)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def inference_cost(method: Any, patients: int = 64, batch_size: int = 32, image_size: int | None = None,
                   repeats: int = 2) -> dict[str, Any]:
    """Parameters and patients/s of the deployable model, and of the same forward pass plus
    the training-only path (teacher backbones and distillation projections), on synthetic
    patients with every input present (the same tensors for both)."""

    model = method.deployable().eval()
    device = next(model.parameters()).device
    teachers = {m: build_expert(s)[0].to(device) for m, s in method.teacher_specs.items()}
    size = image_size or max(int(r["image_size"]) for rs in method.expert_recipes.values() for r in rs)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, patients, batch_size):
        b = min(batch_size, patients - start)
        inputs: dict[str, Any] = {}
        for spec in model.net.inputs:
            if spec["kind"] == "image":
                inputs[spec["name"]] = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8,
                                                     generator=generator).to(device)
            elif spec["kind"] == "tabular":
                n, c = int(spec.get("num_numeric", 0)), len(spec.get("cardinalities", []))
                inputs[spec["name"]] = {"numeric": torch.randn(b, n, generator=generator).to(device),
                                        "numeric_present": torch.ones(b, n, dtype=torch.bool, device=device),
                                        "categorical": torch.zeros(b, c, dtype=torch.long, device=device)}
            else:
                inputs[spec["name"]] = torch.randn(b, int(spec["dim"]), generator=generator).to(device)
        batches.append((inputs, torch.ones(b, len(model.net.inputs), dtype=torch.bool, device=device)))

    def teacher_pass(inputs: dict[str, Any]) -> None:
        for spec in model.net.inputs:
            t = teachers.get(spec.get("modality", ""))
            if spec["kind"] == "image" and t is not None:
                x = model.normalizer(inputs[spec["name"]])
                side = int(method.teacher_specs[spec["modality"]].image_size or size)
                x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
                feats = t(x)
                if spec["name"] in method.projections:  # P_m acts on z_m; its cost is a matmul
                    method.projections[spec["name"]](torch.zeros(x.shape[0], method.hparams.dim, device=device))
                del feats

    def timed(with_teacher: bool) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            for inputs, present in batches:
                model(inputs, present)
                if with_teacher:
                    teacher_pass(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return patients / best

    deploy_params = count_parameters(model)
    teacher_params = sum(count_parameters(t) for t in teachers.values()) + count_parameters(method.projections)
    return {
        "device": str(device), "patients": patients, "batch_size": batch_size, "image_size": size,
        "deployable_parameters": deploy_params,
        "fusion_network_parameters": count_parameters(model.net),
        "training_only_parameters": teacher_params,
        "deployable_patients_per_s": timed(False),
        "with_teacher_patients_per_s": timed(True) if teachers else None,
    }
