"""Backbones for ``midol eval`` and their frozen features, embedded once per (backbone, task,
transform) and cached on disk with the MedMIX feature cache (same keys: a random init or the
sha256 of the weights, the recipe, the transform; an entry a MedMIX run wrote is reused).

A backbone is named on the command line as ``[LABEL=]SPEC``:

=================================  =========================================================
``run/checkpoints/last.ckpt``      a midol checkpoint of any method: its first backbone part
``last.ckpt:director``             ... a named part (``teacher_backbone``, ``director``,
                                   ``experts``, ``director_backbone``, ``experts_backbone``)
``export/teacher_backbone.safetensors``  an export (the JSON beside it gives the recipe)
``export/``                        an export folder: its single part, or ``export/:<part>``
``local-dir:path/model_timm``      timm's local format (``config.json`` + ``model.safetensors``)
``timm:NAME[,k=v...]@weights``     local timm weights for a named timm model
``random:NAME[,k=v...]``           a seeded random initialisation (e.g.
                                   ``random:vit_tiny_patch16_224,img_size=64``)
=================================  =========================================================

The read-out is part of the protocol: a ViT-family backbone (a class token) is read out both
from the class token (``cls``) and as the mean of its patch tokens (``avg``), every other
backbone (Swin: the pooled last stage) by its own pooling (``pool``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from midol.data.feature_cache import (
    CachedFeatures,
    CacheKey,
    FeatureCache,
    file_fingerprint,
    weights_fingerprint,
)
from midol.data.labelled import LabelledSplit
from midol.data.normalize import PixelNormalizer
from midol.data.transforms.eval import EvalTransform
from midol.errors import InputFileError
from midol.fusion.experts import ExpertSpec, build_expert, encoder_key

READOUTS = ("cls", "avg", "pool")
_PART_ALIASES = {"director": "director_backbone", "experts": "experts_backbone",
                 "teacher": "teacher_backbone"}


class BackboneError(InputFileError):
    """A backbone that cannot be named or loaded (one-line message naming the file)."""


@dataclass
class BackboneRef:
    """A backbone as the user named it, and how to build it."""

    label: str
    spec: ExpertSpec
    text: str
    files: list[str] = field(default_factory=list)  # weight files (hashed in the report)
    reference: bool = False  # the random-init reference added by midol eval


@dataclass
class LoadedBackbone:
    """A frozen backbone ready to embed: its read-outs and input size."""

    ref: BackboneRef
    model: nn.Module
    recipe: dict[str, Any]
    readouts: list[str]
    image_size: int

    @property
    def architecture(self) -> str:
        """The timm recipe (model name + overrides): backbones that share it share a random
        reference."""
        return json.dumps({"model": self.recipe["model"], "overrides": self.recipe["overrides"]},
                          sort_keys=True, default=str)


def _kwargs(text: str, where: str) -> tuple[str, dict[str, Any]]:
    """``NAME,k=v,k=v`` -> (NAME, {k: yaml(v)})."""
    name, *pairs = _split_top(text)
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BackboneError(f"{where}: expected key=value after the model name, got {pair!r}")
        key, value = pair.split("=", 1)
        kwargs[key.strip()] = yaml.safe_load(value)
    if not name:
        raise BackboneError(f"{where}: no timm model name")
    return name.strip(), kwargs


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``depths=[1,1,1,1]`` stays one value)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _existing(path: str, where: str) -> str:
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise BackboneError(f"{where}: {path} does not exist")
    return full


def parse_backbone(text: str) -> BackboneRef:
    """A :class:`BackboneRef` from ``[LABEL=]SPEC`` (table in the module docstring)."""
    where = f"backbone {text!r}"
    label: str | None = None
    spec_text = text
    head = text.split("=", 1)[0]
    if "=" in text and re.fullmatch(r"[A-Za-z0-9_.+@-]+", head):  # LABEL=SPEC (no ':' '/' ',')
        label, spec_text = head, text.split("=", 1)[1]
    if spec_text.startswith("random:"):
        name, kwargs = _kwargs(spec_text[len("random:"):], where)
        spec = ExpertSpec(name=label or spec_text, backbone=name, backbone_kwargs=kwargs)
        return BackboneRef(label or spec_text, spec, text)
    if spec_text.startswith("timm:"):
        body = spec_text[len("timm:"):]
        if "@" not in body:
            raise BackboneError(f"{where}: timm weights are named timm:NAME[,k=v]@PATH")
        model_text, weights_text = body.rsplit("@", 1)
        name, kwargs = _kwargs(model_text, where)
        weights_path = _existing(weights_text, where)
        spec = ExpertSpec(name=label or name, backbone=name, backbone_kwargs=kwargs,
                          checkpoint=weights_path, checkpoint_format="timm")
        return BackboneRef(label or f"{name}@{Path(weights_path).name}", spec, text, [weights_path])
    if spec_text.startswith("local-dir:"):
        folder = Path(_existing(spec_text[len("local-dir:"):], where))
        config, weights_file = folder / "config.json", folder / "model.safetensors"
        if not config.is_file() or not weights_file.is_file():
            raise BackboneError(f"{where}: {folder} lacks config.json or model.safetensors "
                                "(timm's local format)")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            name, kwargs = cfg["architecture"], dict(cfg.get("model_args") or {})
            input_size = (cfg.get("pretrained_cfg") or {}).get("input_size")
        except (ValueError, KeyError, AttributeError) as err:
            raise BackboneError(f"{where}: {config} is not a timm config ({err})") from None
        kwargs.pop("num_classes", None)  # midol builds pooled-feature backbones (num_classes=0)
        size = int(input_size[-1]) if isinstance(input_size, list) and input_size else None
        if isinstance(kwargs.get("img_size"), list) and len(set(kwargs["img_size"])) == 1:
            kwargs["img_size"] = int(kwargs["img_size"][0])
        spec = ExpertSpec(name=label or folder.name, backbone=name, backbone_kwargs=kwargs,
                          checkpoint=str(weights_file), checkpoint_format="timm", image_size=size)
        return BackboneRef(label or folder.name, spec, text, [str(weights_file)])
    path_text, part = spec_text, None
    if ":" in spec_text and not os.path.exists(os.path.expanduser(spec_text)):
        path_text, part = spec_text.rsplit(":", 1)
        part = _PART_ALIASES.get(part, part)
    path = Path(_existing(path_text, where))
    if path.is_dir():
        candidates = sorted(p for p in path.glob("*.safetensors") if p.with_suffix(".json").is_file())
        if part is not None:
            candidates = [p for p in candidates if p.stem == part]
        if len(candidates) != 1:
            names = ", ".join(p.stem for p in candidates) or "none"
            raise BackboneError(f"{where}: {path} must hold exactly one exported part "
                                f"(<part>.safetensors + .json){'' if part is None else ' named ' + part}"
                                f"; found {names}: name one as {path_text}:<part>")
        path, part = candidates[0], None
    if path.suffix == ".ckpt":
        dex_mode = None
        if part in ("director_backbone", "experts_backbone"):
            dex_mode = part.split("_")[0]
        spec = ExpertSpec(name=label or path.stem, checkpoint=str(path), checkpoint_format="midol",
                          part=part if dex_mode is None else None, dex_mode=dex_mode)  # type: ignore[arg-type]
        default = f"{path.parent.parent.name or path.stem}" + (f":{part}" if part else "")
        return BackboneRef(label or default, spec, text, [str(path)])
    if path.suffix == ".safetensors":
        if not path.with_suffix(".json").is_file():
            raise BackboneError(f"{where}: {path} has no {path.with_suffix('.json').name} beside it; "
                                "use timm:NAME@PATH for plain timm weights")
        if part is not None:
            raise BackboneError(f"{where}: a .safetensors export holds one part; drop ':{part}'")
        spec = ExpertSpec(name=label or path.stem, checkpoint=str(path), checkpoint_format="exported")
        return BackboneRef(label or f"{path.parent.name}/{path.stem}", spec, text,
                           [str(path), str(path.with_suffix(".json"))])
    raise BackboneError(f"{where}: not a midol checkpoint (.ckpt), an export (.safetensors + "
                        ".json, or its folder), local-dir:, timm:NAME@PATH or random:NAME")


def load(ref: BackboneRef) -> LoadedBackbone:
    """Build the frozen backbone; any failure is one :class:`BackboneError` naming the file."""
    try:
        model, recipe = build_expert(ref.spec)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as err:
        what = ref.spec.checkpoint or ref.spec.backbone
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BackboneError(f"backbone {ref.label!r} ({what}) does not load: {message}") from None
    return LoadedBackbone(ref, model, recipe, readouts_of(model), int(recipe["image_size"]))


def readouts_of(model: nn.Module) -> list[str]:
    """``cls`` and ``avg`` for a backbone with a class token (ViT family), else ``pool``."""
    if getattr(model, "cls_token", None) is not None and hasattr(model, "num_prefix_tokens"):
        return ["cls", "avg"]
    return ["pool"]


def random_reference(backbone: LoadedBackbone, seed: int = 0) -> BackboneRef:
    """The seeded random initialisation of ``backbone``'s timm architecture (DEX layers, if
    any, are not injected: the reference is the dense architecture)."""
    recipe = backbone.recipe
    overrides = dict(recipe["overrides"])
    label = f"random:{recipe['model']}"
    spec = ExpertSpec(name=label, backbone=recipe["model"], backbone_kwargs=overrides,
                      image_size=backbone.image_size, seed=seed)
    return BackboneRef(label, spec, label, [], reference=True)


def _encoder(backbone: LoadedBackbone, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``B x 3 x S x S`` -> the read-outs side by side (``B x R*D``), normalised like
    pre-training, bf16 autocast on CUDA."""
    model = backbone.model.to(device)
    normalizer = PixelNormalizer().to(device)
    readouts = backbone.readouts

    def encode(images: torch.Tensor) -> torch.Tensor:
        x = normalizer(images.to(device, non_blocking=True))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=device.type == "cuda"):
            if readouts == ["pool"]:
                out = model(x)
            else:
                tokens = model.forward_features(x)  # type: ignore[operator]
                prefix = int(getattr(model, "num_prefix_tokens", 1))
                out = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)
        return out.float().cpu()

    return encode


class _RowLoader:
    """Item ``i`` (as the string ``'i'``) of an ImageList: npz rows through the feature
    cache; a class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, split: LabelledSplit) -> None:
        self.images = split.images

    def __call__(self, ref: str) -> np.ndarray:
        return self.images.load(int(ref))


def _items(split: LabelledSplit) -> tuple[list[str], list[str | None] | None, Callable[[str], np.ndarray] | None]:
    paths = split.images.paths
    if paths is not None:
        return list(paths), None, None
    origin = file_fingerprint(split.images.origin)
    refs = [str(i) for i in range(len(split))]
    return refs, [f"{origin}#{split.images.describe(i).rsplit('#', 1)[-1]}" for i in range(len(split))], _RowLoader(split)


@dataclass
class Embedder:
    """Embeds task splits through the shared feature cache.

    Args:
        cache_dir: Root of the feature cache (shared with MedMIX runs that use the same root).
        device: ``cpu`` or ``cuda[:n]``; bf16 autocast on CUDA.
        batch_size: Images per forward pass.
        num_workers: Decoding workers (0: in the main process).
        cache_key: ``stat`` or ``content`` (:class:`~midol.data.feature_cache.FeatureCache`).
    """

    cache_dir: str
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    cache_key: CacheKey = "stat"
    computed: int = 0
    reused: int = 0

    def embed(self, backbone: LoadedBackbone, split: LabelledSplit, size: int,
              desc: str) -> dict[str, np.ndarray]:
        """Read-out -> ``N x D`` float32 features of ``split`` at input side ``size``."""
        files, fingerprints, loader = _items(split)
        result = self.embed_files(backbone, files, size, desc, fingerprints, loader)
        feats = result.features.numpy()
        if not bool(result.ok.all()):
            bad = int((~result.ok).sum())
            raise BackboneError(f"{desc}: {bad} image(s) could not be read, e.g. "
                                f"{', '.join(result.unreadable[:3])}")
        return split_readouts(backbone, feats)

    def embed_files(self, backbone: LoadedBackbone, files: list[str], size: int, desc: str,
                    fingerprints: list[str | None] | None = None,
                    loader: Callable[[str], np.ndarray] | None = None) -> CachedFeatures:
        """The cached features of image ``files`` at input side ``size``: the read-outs side
        by side (:func:`split_readouts` names them), NaN rows and ``ok`` False for unreadable
        files (warned, not raised); counts :attr:`computed` and :attr:`reused`."""
        device = torch.device(self.device)
        key = encoder_key(backbone.ref.spec)
        if backbone.readouts != ["pool"]:
            key += "|readout=cls+avg"
        if device.type == "cuda":
            key += "|bf16"
        encoders: list[Callable[[torch.Tensor], torch.Tensor]] = []

        def encode(images: torch.Tensor) -> torch.Tensor:
            if not encoders:  # moved to the device only when the cache misses
                encoders.append(_encoder(backbone, device))
            return encoders[0](images)

        kwargs: dict[str, Any] = {} if loader is None else {"fingerprints": fingerprints, "load": loader}
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            result = FeatureCache(self.cache_dir, self.cache_key).features(
                encode, key, files, EvalTransform(size), f"EvalTransform({size})",
                self.batch_size, self.num_workers, desc, **kwargs)
        self.computed += result.computed
        self.reused += result.reused
        return result


def split_readouts(backbone: LoadedBackbone, feats: np.ndarray) -> dict[str, np.ndarray]:
    """Read-out -> its columns of the side-by-side features :meth:`Embedder.embed_files` gives."""
    if backbone.readouts == ["pool"]:
        return {"pool": feats}
    dim = feats.shape[1] // 2
    return {"cls": feats[:, :dim], "avg": feats[:, dim:]}


def sha256_files(ref: BackboneRef) -> dict[str, str]:
    """sha256 of each weight file of a backbone (provenance in the report)."""
    return {f: weights_fingerprint(f) for f in ref.files}


def with_label(ref: BackboneRef, label: str) -> BackboneRef:
    return replace(ref, label=label, spec=replace(ref.spec, name=label))


def add_references(loaded: list[LoadedBackbone], seeds: list[int] | None = None,
                   seed: int = 0) -> list[LoadedBackbone]:
    """``loaded`` plus the seeded random init of every architecture without one: a random
    init among the backbones is the reference of its architecture. ``seeds`` (pre-training
    groups) adds one reference per seed, labelled ``random:<model>@<seed>``; otherwise one at
    ``seed`` (midol eval: 0; a study may pass its pre-training seed)."""
    out = list(loaded)
    for b in out:
        b.ref.reference = b.ref.spec.checkpoint is None
    for b in list(out):
        if any(x.ref.reference and x.architecture == b.architecture for x in out):
            continue
        for s in seeds or [seed]:
            ref = random_reference(b, s)
            if seeds:
                ref = with_label(ref, f"{ref.label}@{s}")
            if ref.label in {x.ref.label for x in out}:
                ref = with_label(ref, f"{ref.label}#{len(out)}")
            out.append(load(ref))
    return out


def provenance_rows(loaded: list[LoadedBackbone]) -> list[dict[str, Any]]:
    """What the report says of each backbone: spec, source, read-outs, size, sha256 of files."""
    return [{"label": b.ref.label, "spec": b.ref.text, "source": b.recipe["source"],
             "model": b.recipe["model"], "readouts": b.readouts, "image_size": b.image_size,
             "reference": b.ref.reference, "sha256": sha256_files(b.ref)} for b in loaded]
