"""MedMIX's typed hyper-parameters and their checks (one-line errors naming the option)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from midol.data.feature_cache import CacheKey
from midol.methods.base import BaseMethodOptions
from midol.methods.validation import raise_on_failed
from midol.models.fusion import FusionMode, PoolMode


class MedMIXOptions(BaseMethodOptions, Protocol):
    """``self.hparams`` of :class:`MedMIX`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    experts: dict[str, list[dict[str, Any]]]
    teachers: dict[str, dict[str, Any]] | None
    dim: int
    pooling: PoolMode
    expert_dropout: float
    fusion: FusionMode
    aux_heads: bool
    aux_weight: float
    aux_entropy_scores: bool
    hidden_dim: int
    head_dropout: float
    distill_weight: float
    teacher_logits: str | None
    kd_weight: float
    kd_temperature: float
    train_drop_rate: float
    train_drop_input: str | None
    missingness_balance: bool
    negative_labels: list[str] | None
    finetune_experts: bool
    cache_dir: str
    cache_key: CacheKey
    feature_batch_size: int
    feature_workers: int
    structure: dict[str, Any] | None
    input_specs: dict[str, Any] | None


def validate_options(h: MedMIXOptions) -> None:
    """One-line errors naming the option, before anything is built."""
    checks = [
        ("dim", h.dim >= 1, ">= 1"), ("hidden_dim", h.hidden_dim >= 1, ">= 1"),
        ("expert_dropout", 0 <= h.expert_dropout < 1, "in [0, 1)"),
        ("head_dropout", 0 <= h.head_dropout < 1, "in [0, 1)"),
        ("aux_weight", h.aux_weight >= 0, ">= 0"),
        ("distill_weight", h.distill_weight >= 0, ">= 0"),
        ("kd_weight", h.kd_weight >= 0, ">= 0"), ("kd_temperature", h.kd_temperature > 0, "> 0"),
        ("train_drop_rate", 0 <= h.train_drop_rate < 1, "in [0, 1)"),
        ("feature_batch_size", h.feature_batch_size >= 1, ">= 1"),
        ("feature_workers", h.feature_workers >= 0, ">= 0"),
        ("cache_key", h.cache_key in ("stat", "content"), "'stat' or 'content'"),
    ]
    raise_on_failed(h, checks)
    if h.pooling not in ("attention", "mean", "concat"):
        raise ValueError(f"pooling must be attention, mean or concat, got {h.pooling!r}")
    if h.fusion not in ("reliability", "mean", "concat_missing", "transformer"):
        raise ValueError(f"fusion must be reliability, mean, concat_missing or transformer, "
                         f"got {h.fusion!r}")
    if h.fusion == "transformer" and h.dim % 4:
        raise ValueError(f"dim must be a multiple of 4 with fusion: transformer (its 4 heads), "
                         f"got {h.dim}")
    if h.kd_weight > 0 and not h.teacher_logits:
        raise ValueError("kd_weight > 0 needs teacher_logits (a CSV of teacher logits)")
    if h.teacher_logits and h.structure is None and not Path(h.teacher_logits).expanduser().is_file():
        raise FileNotFoundError(f"teacher_logits: {h.teacher_logits} does not exist")
