"""Export backbones as safetensors plus a JSON that says how to rebuild them with timm.

A method names what is worth keeping (``export_modules()``, e.g. M-IDoL's teacher backbone);
this module only writes files: ``<name>.safetensors`` and ``<name>.json`` per exported part.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import midol
from midol.data.feature_cache import weights_fingerprint
from midol.data.transforms.common import IMAGENET_MEAN, IMAGENET_STD
from midol.errors import CheckpointFileError
from midol.io.atomic import atomic_path, atomic_write_text, default_file_mode
from midol.methods.interfaces import BackboneExport, Pretrained

BACKBONE_FILE = "teacher_backbone.safetensors"  # M-IDoL's default part, kept for old scripts
META_FILE = "teacher_backbone.json"


def export_backbone(
    part: BackboneExport,
    out_dir: str | Path,
    name: str,
    image_size: int | None = None,
    source: str | None = None,
    overwrite: bool = True,
    timm_format: bool = True,
) -> Path:
    """Write ``out_dir/<name>.safetensors`` and ``out_dir/<name>.json``; returns the first.
    With ``timm_format`` (not for DEX routed-experts parts) also ``out_dir/<name>_timm/``
    (:func:`export_timm_dir`).

    Both are written atomically (temp file beside them, then renamed); ``overwrite=False``
    refuses to replace an existing export."""
    out = Path(out_dir)
    path, meta_path = out / f"{name}.safetensors", out / f"{name}.json"
    if not overwrite and (path.exists() or meta_path.exists()):
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in part.module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "timm_model": part.timm_model})
    overrides = dict(part.overrides)
    meta = {
        "timm_model": part.timm_model,
        "overrides": overrides,
        "num_classes": 0,
        "image_size": image_size or part.image_size or overrides.get("img_size", 224),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "RGB scaled to [0, 1], then (x - mean) / std",
        "description": part.description,
        **({"dex": part.dex} if part.dex else {}),
        "source": source,
        "midol_version": midol.__version__,
        # the weights this description belongs to: a kill between the two files (issue 26
        # item 16) leaves new weights beside an old JSON, which a reader then refuses
        "sha256": weights_fingerprint(path),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    if timm_format and not part.dex:  # timm's format cannot express injected DEX layers
        export_timm_dir(part, out / f"{name}_timm", int(meta["image_size"]))
    return path


def export_timm_dir(part: BackboneExport, directory: str | Path, image_size: int) -> Path:
    """The backbone in timm's own local format (``config.json`` + ``model.safetensors``), so
    ``timm.create_model("local-dir:<directory>", pretrained=True)`` rebuilds it with the right
    ``pretrained_cfg`` (input size, mean, std) — which the plain safetensors + JSON cannot give
    timm's data pipeline. Files are written to a temporary folder beside it, then swapped in."""
    from timm.models import save_for_hf

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    module = part.module
    saved_cfg = getattr(module, "pretrained_cfg", None)
    cfg = dict(saved_cfg or {})
    cfg.update(input_size=[3, image_size, image_size], fixed_input_size=False,
               mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), num_classes=0,
               tag=f"midol-{midol.__version__}")
    cfg.pop("hf_hub_id", None)
    cfg.pop("url", None)
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in part.overrides.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        module.pretrained_cfg = cfg
        save_for_hf(module, str(tmp), model_config={"architecture": part.timm_model, "num_classes": 0},
                    model_args=model_args, safe_serialization=True)
        for f in tmp.iterdir():
            os.chmod(f, default_file_mode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if saved_cfg is not None:
            module.pretrained_cfg = saved_cfg
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_method(
    method: Pretrained,
    out_dir: str | Path,
    parts: list[str] | None = None,
    image_size: int | None = None,
    source: str | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Export ``parts`` of a live method (default: its first ``export_modules()`` entry)."""
    available = method.export_modules()
    if not available:
        raise ValueError(f"{type(method).__name__} exports no backbone")
    chosen = parts or [next(iter(available))]
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise ValueError(f"unknown export part(s) {unknown}; {type(method).__name__} exports "
                         f"{', '.join(available)}")
    untrained = untrained_reason(method)
    if untrained:
        warnings.warn(
            f"exporting an untrained model: {type(method).__name__} {untrained}, so "
            f"{', '.join(chosen)} hold(s) its initial weights (random, or init_checkpoint's), "
            "not pre-trained ones. Check trainer.max_steps / max_epochs (0 trains nothing), "
            "the data, and whether every step was skipped (nonfinite: skip).",
            UserWarning, stacklevel=2,
        )
    return [export_backbone(available[p], out_dir, p, image_size, source, overwrite) for p in chosen]


def untrained_reason(method: Any) -> str | None:
    """Why ``method`` has not been trained, or None: no image counted in its ``images_seen``
    (a checkpoint keeps it; BaseMethod counts only batches whose loss was finite), or, in a
    live Trainer, global step 0."""
    seen = getattr(method, "images_seen", None)
    trainer = getattr(method, "_trainer", None)
    step = getattr(trainer, "global_step", None) if trainer is not None else None
    at_step = f" (global step {step})" if step is not None else ""
    if seen is not None and int(seen) == 0:
        return f"has trained on 0 images{at_step}"
    if step == 0:
        return "has taken no optimiser step (global step 0)"
    return None


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    image_size: int | None = None,
    parts: list[str] | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Export from a pre-training checkpoint (read with ``weights_only=True``)."""
    from midol.methods.loading import load_method  # loading builds every method: import on use

    method = load_method(ckpt_path)
    return export_method(method, out_dir, parts, image_size, str(ckpt_path), overwrite)


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """The JSON beside an exported ``.safetensors``."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: its description {meta_path} is missing")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    recorded = meta.get("sha256")
    if recorded is not None and Path(path).is_file() and weights_fingerprint(path) != recorded:
        raise CheckpointFileError(
            f"{path}: {meta_path.name} describes other weights (sha256 {str(recorded)[:12]}…): the "
            "export was interrupted between its files; export it again")
    return meta


