"""Released weights -> a timm backbone: key maps per source layout, and a load report.

Continued pre-training starts from someone else's file, written in its own key layout:

* ``timm``: timm's own names (identity; also the DINO release and a timm export).
* ``swin_ms``: Microsoft's Swin release (``swin_base_patch4_window7_224_22k.pth``): patch
  merging at the end of a stage (``layers.0.downsample``), where timm has it at the start of
  the next; buffers (``relative_position_index``, ``attn_mask``) stored.
* ``dinov2``: DINOv2's hub ViTs: layer scale ``blocks.N.ls1.gamma`` (timm's name too),
  ``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``, training checkpoints with chunked
  blocks ``blocks.C.N.`` (FSDP block chunks), ``pos_embed`` for 518 px (37 x 37 patches).
* ``dinov3``: DINOv3's ViTs (timm's ``vit_*_dinov3`` Eva models): ``storage_tokens``, RoPE
  periods, layer scale, a split ``qkv`` bias.
* ``mae``: MAE and RETFound (``{"model": ...}``): decoder tensors (``decoder_*``, ``mask_token``)
  are pre-training only; ``norm`` (pre-training) vs ``fc_norm`` (global-pool fine-tuning).

The renames and the tensor conversions that timm already implements in the architecture's
``checkpoint_filter_fn`` (Microsoft Swin, DINOv2 registers and SwiGLU, DINOv3, position
embeddings resampled bicubically with ``timm.layers.resample_abs_pos_embed``, Swin relative
position tables with ``timm.layers.resize_rel_pos_bias_table``, patch embeddings with
``resample_patch_embed``) are reused; midol adds only what timm lacks (chunked DINOv2 blocks,
MAE's decoder and ``norm``/``fc_norm``, checkpoints that nest the backbone under a prefix).

Every tensor is accounted for in a :class:`LoadReport`: loaded (as stored, possibly renamed),
reshaped (interpolated, resized, split or combined by a conversion), left at random init, or
ignored (with why). :func:`check_report` refuses a start when too little loads.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

Layout = Literal["auto", "timm", "swin_ms", "dinov2", "dinov3", "mae"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
REPORT_NAME = "init_report.json"

# Containers that checkpoints of DINO, solo-learn, Lightning, MAE and the Swin release nest
# weights in (the first one present is taken).
_NESTED_KEYS = ("state_dict", "model", "teacher", "module")
# Prefixes every key of a file may carry (stripped when all keys have them) ...
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "encoder.", "model.")
# ... and prefixes that name the backbone inside a whole training checkpoint (a DINO teacher
# beside its head, a midol .ckpt's student and teacher): those keys are taken, the rest ignored.
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 block chunks: blocks.C.N.
_BUFFERS = ("relative_position_index", "attn_mask", ".periods", ".bias_mask")


class InitWeightsError(ValueError):
    """A weights file that does not fit the backbone well enough to start from."""


@dataclass
class LoadReport:
    """What a weights file gave a backbone, tensor by tensor (state-dict names).

    ``loaded``: backbone name -> file name (equal unless a key map renamed it); ``reshaped``:
    backbone name -> ``"file name (shape) -> (shape)"``; ``random_init``: backbone tensors the
    file did not provide; ``ignored``: file name -> why it was not used."""

    source: str
    layout: str
    backbone_tensors: int
    loaded: dict[str, str] = field(default_factory=dict)
    reshaped: dict[str, str] = field(default_factory=dict)
    random_init: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Share of the backbone's tensors that came from the file (loaded or reshaped)."""
        return (len(self.loaded) + len(self.reshaped)) / max(self.backbone_tensors, 1)

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.loaded), "reshaped": len(self.reshaped),
                "random_init": len(self.random_init), "ignored": len(self.ignored)}

    def table(self) -> str:
        """A compact table: one line per kind, with its count and a few names."""
        renamed = sum(1 for k, v in self.loaded.items() if k != v)
        rows = [
            ("loaded", len(self.loaded), f"{renamed} renamed" if renamed else ""),
            ("reshaped", len(self.reshaped), _examples(_shapes(k, v) for k, v in self.reshaped.items())),
            ("random init", len(self.random_init), _examples(self.random_init)),
            ("ignored", len(self.ignored), _examples(f"{k} ({v})" for k, v in self.ignored.items())),
        ]
        head = (f"init weights {self.source} (layout {self.layout}): "
                f"{len(self.loaded) + len(self.reshaped)} of {self.backbone_tensors} backbone "
                f"tensors from the file ({self.fraction:.1%})")
        return "\n".join([head] + [f"  {name:<12}{n:>6}  {detail}".rstrip() for name, n, detail in rows])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts(), "fraction": self.fraction}

    def save(self, folder: str | Path) -> Path:
        """Write ``init_report.json`` into ``folder`` (atomically)."""
        from midol.io.atomic import atomic_write_text

        path = Path(folder) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def _shapes(key: str, entry: str) -> str:
    """``pos_embed (1, 197, 768) -> (1, 257, 768)``; the file's name only where it differs."""
    return entry if entry.startswith(key + " ") else f"{key} <- {entry}"


def _examples(names: Any, n: int = 2) -> str:
    names = list(names)
    if not names:
        return ""
    more = f", ... (+{len(names) - n})" if len(names) > n else ""
    return "e.g. " + ", ".join(names[:n]) + more if more else ", ".join(names)


def unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """The tensor mapping inside a checkpoint's containers (``state_dict``, ``model``, ...)."""
    for key in _NESTED_KEYS:
        if key in state and isinstance(state[key], dict):
            return unwrap(state[key])
    return state


def strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Remove the prefixes every key carries; keep only a backbone's keys when the file holds
    more (a DINO teacher's ``backbone.`` beside its ``head.``). Returns the tensors and the
    ignored keys with why."""
    ignored: dict[str, str] = {}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    for prefix in _BACKBONE_PREFIXES:
        if state and any(k.startswith(prefix) for k in state):
            ignored.update({k: f"outside {prefix[:-1]}" for k in state if not k.startswith(prefix)})
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state, ignored


def detect_layout(state: dict[str, Any], model: nn.Module) -> str:
    """The source layout, read from the keys (see the module docstring)."""
    keys = set(state)
    if "storage_tokens" in keys:
        return "dinov3"
    if ("register_tokens" in keys or any(_CHUNKED_BLOCK.match(k) for k in keys)
            or ("mask_token" in keys and any(".ls1.gamma" in k for k in keys))):
        return "dinov2"
    if any(k.startswith("decoder_") for k in keys) or "mask_token" in keys:
        return "mae"
    if "layers.0.downsample.reduction.weight" in keys and _is_swin(model):
        return "swin_ms"
    return "timm"


def _is_swin(model: nn.Module) -> bool:
    return type(model).__module__.endswith("swin_transformer")


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "pos_embed")


def _check_layout(layout: str, state: dict[str, Any], model: nn.Module) -> None:
    kind = type(model).__name__
    if layout not in LAYOUTS:
        raise InitWeightsError(f"init_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "swin_ms" and not _is_swin(model):
        raise InitWeightsError(f"init_layout swin_ms (Microsoft's Swin release) needs a timm Swin, got {kind}")
    if layout == "swin_ms" and "layers.0.downsample.reduction.weight" not in state:
        raise InitWeightsError("init_layout swin_ms: the file has no layers.0.downsample (Microsoft's "
                               "Swin release merges patches at the end of stage 0); try init_layout: timm")
    if layout in ("dinov2", "mae") and not _is_vit(model):
        raise InitWeightsError(f"init_layout {layout} needs a timm ViT, got {kind}")
    if layout == "dinov3" and not type(model).__module__.endswith(".eva"):
        raise InitWeightsError(f"init_layout dinov3 needs timm's DINOv3 ViT (vit_*_dinov3, an Eva), got {kind}")


def premap(state: dict[str, Any], model: nn.Module, layout: str) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """midol's key maps, before timm's filter: returns (tensors under new names, new name ->
    file name, ignored file name -> why). Tensors are not copied (the report tracks them)."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    ignored: dict[str, str] = {}
    own = set(model.state_dict())
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            ignored[name] = "not a tensor"
            continue
        new = name
        if layout == "dinov2":
            new = _CHUNKED_BLOCK.sub(r"blocks.\1.", new)  # blocks.C.N.x -> blocks.N.x
        if layout == "mae" and (new.startswith("decoder_") or new == "mask_token"):
            ignored[name] = "MAE decoder (pre-training only)"
            continue
        if layout in ("mae", "timm") and _is_vit(model):
            # MAE pre-trains with `norm`; its global-pool fine-tuning (and RETFound's) uses
            # `fc_norm`: the same LayerNorm after the last block, moved to the pooled feature.
            head, _, tail = new.partition(".")
            if head in ("norm", "fc_norm") and new not in own:
                other = ("fc_norm" if head == "norm" else "norm") + "." + tail
                if other in own and other not in state:
                    new = other
        out[new] = value
        origin[new] = name
    return out, origin, ignored


def _timm_filter(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The architecture's own ``checkpoint_filter_fn`` (timm's conversions), when it has one."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    return dict(filter_fn(state, model)) if filter_fn is not None else dict(state)


def _storage(t: torch.Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.numel() else None


def _why_ignored(name: str, model_keys: set[str]) -> str:
    if name == "mask_token":
        return "masked-image token (pre-training only)"
    if any(b in name for b in _BUFFERS):
        return "buffer the model recomputes"
    if name.startswith(("head.", "head_", "fc.", "classifier.", "lm_head.")) or name == "head":
        return "classifier head"
    if name in model_keys:
        return "converted into another tensor"
    return "no such tensor in the backbone"


def convert_state_dict(
    state: dict[str, Any], model: nn.Module, layout: str = "auto", source: str = "weights",
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a file's tensors onto ``model``'s names; returns them and the :class:`LoadReport`.

    Raises :class:`InitWeightsError` (one line) when a tensor has the model's name but another
    shape that no conversion fixes (another architecture or size)."""
    state, ignored = strip_prefixes(unwrap(state))
    if layout == "auto":
        layout = detect_layout(state, model)
    _check_layout(layout, state, model)
    mapped, origin, dropped = premap(state, model, layout)
    ignored.update(dropped)
    by_storage: dict[int, list[str]] = {}
    for name, value in mapped.items():
        ptr = _storage(value)
        if ptr is not None:
            by_storage.setdefault(ptr, []).append(name)
    converted = _timm_filter(dict(mapped), model)
    own = model.state_dict()
    report = LoadReport(source=source, layout=layout, backbone_tensors=len(own))
    result: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    mismatched = []
    for key, target in own.items():
        value = converted.get(key)
        if not isinstance(value, torch.Tensor):
            report.random_init.append(key)
            continue
        if value.shape != target.shape:
            mismatched.append(key)
            continue
        src = _provenance(key, value, mapped, by_storage)
        result[key] = value
        if src is None:  # made by a conversion from several tensors, none of them kept whole
            report.reshaped[key] = f"(combined) -> {tuple(value.shape)}"
            continue
        used.add(src)
        stored = mapped[src]
        same = (value is stored or (value.shape == stored.shape and value.stride() == stored.stride()
                and value.storage_offset() == stored.storage_offset() and _storage(value) == _storage(stored)))
        if same:
            report.loaded[key] = origin[src]
        else:
            report.reshaped[key] = f"{origin[src]} {tuple(stored.shape)} -> {tuple(value.shape)}"
    if mismatched:
        k = mismatched[0]
        raise InitWeightsError(
            f"{source}: shapes differ from the model for {len(mismatched)} tensors, e.g. {k}: "
            f"{tuple(converted[k].shape)} vs {tuple(own[k].shape)} (another architecture or size? "
            f"layout {layout})")
    keys = set(own)
    for name in mapped:
        if name not in used:
            ignored[origin[name]] = _why_ignored(name, keys)
    report.ignored = dict(sorted(ignored.items()))
    return result, report


def _provenance(key: str, value: torch.Tensor, mapped: dict[str, Any],
                by_storage: dict[int, list[str]]) -> str | None:
    """The file tensor (name after midol's maps) that ``value`` came from: the one whose memory
    it shares (a rename or a view), else the one of the same name (an interpolation)."""
    ptr = _storage(value)
    names = by_storage.get(ptr, []) if ptr is not None else []
    if key in names or (not names and key in mapped):
        return key
    return names[0] if names else None


def check_report(report: LoadReport, min_loaded: float) -> None:
    """:class:`InitWeightsError` (one line, with counts and examples) when nothing, or less than
    ``min_loaded`` of the backbone's tensors, came from the file (``1.0``: every tensor must)."""
    if not 0.0 <= min_loaded <= 1.0:
        raise InitWeightsError(f"min_loaded must lie in [0, 1], got {min_loaded!r}")
    got = len(report.loaded) + len(report.reshaped)
    if got and report.fraction >= min_loaded and not (min_loaded >= 1.0 and report.random_init):
        return
    c = report.counts()
    missing = f"; missing e.g. {report.random_init[:2]}" if report.random_init else ""
    unused = f"; ignored e.g. {list(report.ignored)[:2]}" if report.ignored else ""
    what = ("no tensor matches the backbone's parameter names" if not got else
            f"{c['random_init']} backbone tensors are missing from the checkpoint")
    raise InitWeightsError(
        f"{report.source}: {what}: {got} of {report.backbone_tensors} load ({report.fraction:.1%} "
        f"< min_loaded {min_loaded:g}; loaded {c['loaded']}, reshaped {c['reshaped']}, random init "
        f"{c['random_init']}, ignored {c['ignored']}){missing}{unused}; check init_layout "
        f"(layout {report.layout}) and the backbone")
