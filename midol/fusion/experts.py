"""The frozen image experts (and training-only teachers) of MedMIX, and their cached features.

An expert is any backbone the fine-tuning modules can load (:func:`midol.tasks.backbones.
load_backbone`): a midol training checkpoint, an exported ``.safetensors`` with its JSON, or a
timm model with local weights or a seeded random initialisation. Its features depend only on
(backbone, file, transform), so they are computed once and kept in a
:class:`~midol.data.feature_cache.FeatureCache` keyed by all three.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from midol.data.feature_cache import weights_fingerprint
from midol.data.normalize import PixelNormalizer
from midol.models.backbone import build_backbone
from midol.tasks.backbones import CheckpointFormat, detect_format, load_backbone, with_dex_layers

DEFAULT_IMAGE_SIZE = 224


@dataclass
class ExpertSpec:
    """One frozen backbone (an expert, or a training-only teacher).

    Attributes:
        name: label in logs and reports (e.g. ``midol``, ``dino``, ``random_resnet``).
        backbone: timm model name; leave null for a midol checkpoint or an export (read from
            the file).
        backbone_kwargs: extra ``timm.create_model`` keywords (added to the recorded ones).
        checkpoint: weights: a midol ``.ckpt``, an exported ``.safetensors`` (JSON beside it),
            local timm weights, or null for a random initialisation (seeded by ``seed``).
        checkpoint_format: ``auto`` (by file name), ``midol``, ``exported`` or ``timm``.
        part: which backbone of a midol training checkpoint (default: its method's first).
        dex_mode: ``director`` or ``experts`` for a DEX backbone.
        image_size: input side in pixels (default: the size the file records, else
            ``backbone_kwargs.img_size``, else 224).
        seed: seed of a random initialisation (a control expert): the same seed gives the same
            weights, so cached features stay valid.
    """

    name: str
    backbone: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_format: CheckpointFormat = "auto"
    part: str | None = None
    dex_mode: Literal["director", "experts"] | None = None
    image_size: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, value: ExpertSpec | dict[str, Any], where: str, check_files: bool = True) -> ExpertSpec:
        if isinstance(value, ExpertSpec):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: an expert is a mapping (name, backbone, checkpoint, ...), "
                             f"got {value!r}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown expert key(s) {unknown}; allowed: {sorted(allowed)}")
        if "name" not in value:
            raise ValueError(f"{where}: every expert needs a name")
        spec = cls(**value)
        if check_files and spec.checkpoint is not None and not Path(spec.checkpoint).expanduser().exists():
            raise FileNotFoundError(f"{where} ({spec.name}): weights file {spec.checkpoint} does "
                                    "not exist (see the README's MedMIX section for the command "
                                    "that writes midol's demo exports)")
        if spec.image_size is not None and spec.image_size < 8:
            raise ValueError(f"{where} ({spec.name}): image_size must be >= 8, got {spec.image_size}")
        return spec


def parse_expert_table(value: dict[str, list[Any]] | None, what: str,
                       check_files: bool = True) -> dict[str, list[ExpertSpec]]:
    """``{modality: [spec, ...]}`` with unique names per modality; ``check_files=False`` when
    the experts are rebuilt from a checkpoint (their weights are in it, the files need not be)."""
    out: dict[str, list[ExpertSpec]] = {}
    for modality, specs in (value or {}).items():
        if not isinstance(specs, list) or not specs:
            raise ValueError(f"{what}.{modality}: give a non-empty list of experts")
        parsed = [ExpertSpec.parse(s, f"{what}.{modality}[{i}]", check_files) for i, s in enumerate(specs)]
        names = [s.name for s in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}.{modality}: expert names must be unique, got {names}")
        out[modality] = parsed
    return out


def encoder_key(spec: ExpertSpec) -> str:
    """What the features of ``spec`` depend on besides file and transform: the architecture,
    the weights' bytes (a hash) or the random seed, and the part/mode picked from the file."""
    fmt = detect_format(spec.checkpoint) if spec.checkpoint_format == "auto" else spec.checkpoint_format
    recipe: dict[str, Any] = {"backbone": spec.backbone, "kwargs": spec.backbone_kwargs,
                              "format": fmt, "part": spec.part, "dex_mode": spec.dex_mode}
    if spec.checkpoint is None:
        recipe["weights"] = f"random init seed {spec.seed} timm {timm.__version__} torch {torch.__version__}"
    else:
        recipe["weights"] = weights_fingerprint(spec.checkpoint)
        meta = Path(spec.checkpoint).with_suffix(".json")
        if fmt == "exported" and meta.is_file():
            recipe["export_json"] = meta.read_text()
    return json.dumps(recipe, sort_keys=True, default=str)


def build_expert(spec: ExpertSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen backbone (eval mode, no gradients) and its recipe: ``model``, ``overrides``,
    ``dex``, ``image_size``, ``dim``, ``source`` (enough to rebuild it without the file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model, info = load_backbone(spec.backbone, spec.backbone_kwargs, spec.checkpoint,
                                    spec.checkpoint_format, spec.part, dex_mode=spec.dex_mode)
    size = spec.image_size or info.image_size or info.overrides.get("img_size") or DEFAULT_IMAGE_SIZE
    freeze(model)
    recipe = {"name": spec.name, "model": info.model, "overrides": dict(info.overrides),
              "dex": info.dex, "image_size": int(size), "dim": feature_width(model),
              "source": info.source}
    return model, recipe


def build_from_recipe(recipe: dict[str, Any]) -> nn.Module:
    """The architecture a recipe records, without weights (a checkpoint's state dict fills it)."""
    model = with_dex_layers(build_backbone(recipe["model"], dict(recipe["overrides"])), recipe.get("dex"))
    freeze(model)
    return model


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()


def spec_dict(spec: ExpertSpec) -> dict[str, Any]:
    return asdict(spec)


def feature_encoder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``B x 3 x S x S`` -> pooled features, normalised like pre-training, in eval mode."""
    normalizer = PixelNormalizer()

    def encode(images: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(normalizer.to(device)(images.to(device))).float().cpu()
        finally:
            model.train(was_training)

    return encode


def expert_features(images: torch.Tensor, experts: Sequence[nn.Module],
                    recipes: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """Float features of normalised images through each expert, each input resized to that
    expert's own side first (bicubic, antialiased, as the feature cache's pre-processing): the
    one path of training (``MedMIX.expert_features``) and the deployable model."""
    out = []
    for model, recipe in zip(experts, recipes, strict=True):
        size = int(recipe["image_size"])
        x = images if tuple(images.shape[-2:]) == (size, size) else F.interpolate(
            images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(model(x).float())
    return out


def feature_width(model: nn.Module) -> int:
    """timm's ``num_features`` of a backbone."""
    width: Any = model.num_features
    return int(width)
