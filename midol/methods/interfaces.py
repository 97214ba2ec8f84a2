"""The small interface between a method and the rest of midol.

Export, routing tables, the routing monitor, ``midol analyze``/``route`` and downstream loading
talk to a method only through these: no module outside a method indexes into its submodules.
A method without a router (the DINO baseline, MAE) simply reports none; one without a teacher
(DEX) or that discards it (MedMIX) exports whatever it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypedDict, runtime_checkable

import torch
from torch import nn


@dataclass
class BackboneExport:
    """A backbone worth keeping after pre-training and its timm recipe:
    ``timm.create_model(timm_model, num_classes=0, **overrides)`` loads it strictly."""

    module: nn.Module
    timm_model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    description: str = ""
    # DEX routed-experts backbones: the DEX layers to inject into the timm model before the
    # strict load (``blocks``, ``num_experts``, ``top_k``, ``temperature``, ``token_routing``);
    # None for a plain timm backbone
    dex: dict[str, Any] | None = None


class ExpertChoice(NamedTuple):
    """The expert each image of a training batch went to, as one router saw it.

    ``collapse_check``: warn when one expert takes most of many consecutive batches;
    ``idle_check``: warn at an epoch end when some experts received almost no image."""

    expert: torch.Tensor  # (B,) int64
    num_experts: int
    collapse_check: bool = True
    idle_check: bool = True
    label: str = ""  # what the assignment is, for plot titles and warnings


class StepOutput(TypedDict, total=False):
    """What a method's ``training_step`` returns (``None`` for a skipped step).

    ``routing``: per log prefix (``route_epoch``, ``route_block03``, ...) the per-image expert
    of this step, accumulated by the routing monitor into expert x modality tables.
    ``health``: scalar diagnostics computed on the steps where ``health_due()`` is true (e.g.
    ``teacher/mean_cosine``), logged and checked for collapse by the monitor."""

    loss: torch.Tensor
    routing: dict[str, ExpertChoice]
    health: dict[str, torch.Tensor]


class Routing(NamedTuple):
    """Per-image routing of one router at inference: top-1 expert and its probability."""

    expert: torch.Tensor  # (B,) int64
    confidence: torch.Tensor  # (B,) float


@runtime_checkable
class Pretrained(Protocol):
    """Anything that yields backbones worth keeping."""

    def export_modules(self) -> dict[str, BackboneExport]:
        """Backbones by export name, the default first (M-IDoL: ``teacher_backbone``)."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of uint8 ``B x 3 x H x W`` images from the default export."""
        ...


@runtime_checkable
class Routed(Protocol):
    """Anything with routers (M-IDoL: the projector's; DEX: one per block)."""

    def routers(self) -> dict[str, int]:
        """Router name -> number of experts; empty when the model has no router."""
        ...

    def route(
        self, images: torch.Tensor, temperature: float | None = None
    ) -> tuple[torch.Tensor, dict[str, Routing]]:
        """Pooled features of uint8 images and every router's per-image routing, in one pass
        (``temperature`` scales the confidence; None: the method's own)."""
        ...


@runtime_checkable
class Monitored(Protocol):
    """A method that computes ``StepOutput["health"]`` when asked (BaseMethod)."""

    def request_health(self, every_n_steps: int) -> None:
        """Compute the health statistics every ``every_n_steps`` steps (0: never)."""
        ...


def has_routers(module: object) -> bool:
    """True for a :class:`Routed` module that has at least one router."""
    return isinstance(module, Routed) and bool(module.routers())
