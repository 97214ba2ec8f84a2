"""The deployable MedMIX network on expert features: per-input encoders, fusion, task head.

MedMIX (Cho, Qiu, Li 2026, arXiv 2605.16639) establishes intra-modality fusion of several
expert embeddings and learned, sample-specific fusion over the inputs that are present; the
layers are midol's design, a reconstruction from the abstract (``docs/papers/medmix.md``
and :mod:`midol.models.fusion`). This module holds what is deployed: no teacher and no
distillation projection live here. Plain PyTorch, no Lightning.

The network's shape comes from a JSON-able ``structure`` (what the data and the experts
imply), so a checkpoint can rebuild it without re-reading the data::

    {"inputs": [{"name": "left_fundus", "kind": "image", "modality": "fundus"},
                {"name": "demographics", "kind": "tabular", "num_numeric": 1,
                 "cardinalities": [2]},
                {"name": "report", "kind": "embedding", "dim": 768}],
     "expert_dims": {"fundus": [768, 768, 512]},
     "task": "multilabel", "label_names": ["N", "D", ...]}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from midol.models.fusion import ExpertPooling, FusionMode, InputFusion, PoolMode, TabularEncoder


class NetOutput(NamedTuple):
    logits: torch.Tensor  # B x L
    z: torch.Tensor  # B x M x dim: the fused embedding of every input (meaningless where absent)
    input_weights: torch.Tensor | None  # B x M fusion weights (reliability, mean), 0 where absent
    expert_weights: dict[str, torch.Tensor]  # image input -> B x K attention over its experts
    aux_logits: dict[str, torch.Tensor]  # input -> B x L (when aux heads are on)


def check_structure(structure: dict[str, Any]) -> None:
    """One-line ``ValueError`` for a structure that cannot build a network."""
    inputs = structure.get("inputs")
    if not inputs:
        raise ValueError("structure needs a non-empty 'inputs' list")
    if structure.get("task") not in ("multilabel", "multiclass"):
        raise ValueError(f"structure task must be multilabel or multiclass, got {structure.get('task')!r}")
    if not structure.get("label_names"):
        raise ValueError("structure needs 'label_names'")
    dims = structure.get("expert_dims", {})
    for spec in inputs:
        kind = spec.get("kind")
        if kind == "image" and not dims.get(spec.get("modality")):
            raise ValueError(f"image input {spec.get('name')!r}: no experts for modality "
                             f"{spec.get('modality')!r}")
        if kind not in ("image", "tabular", "embedding"):
            raise ValueError(f"input {spec.get('name')!r}: unknown kind {kind!r}")


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy over labels of ``sigmoid(logits)`` (B x L -> B), in nats."""
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).mean(dim=-1)


class MedMIXNet(nn.Module):
    """Per-input encoders + inter-input fusion + task head (MedMIX parts 1 and 2).

    * image input: :class:`ExpertPooling` of its K expert embeddings; inputs of one modality
      share one pooling module (both eyes: twice the data for it);
    * tabular input: :class:`TabularEncoder` (statistics fitted on the training split);
    * embedding input: ``LayerNorm(Linear(e))``;
    * :class:`InputFusion` over the present inputs (``fusion`` mode), dropout, a linear head;
    * optional auxiliary heads, one per input; with ``aux_entropy_scores`` the negative
      entropy of an input's (detached) auxiliary prediction is added to its reliability score.

    Args:
        structure: see the module docstring.
        dim: common width of every input embedding.
        pooling / expert_dropout: :class:`ExpertPooling` mode and expert dropout.
        fusion: :class:`InputFusion` mode.
        aux_heads / aux_entropy_scores: see above.
        hidden_dim: width of the tabular MLP and the reliability scorer.
        head_dropout: dropout before the task head.
    """

    def __init__(
        self,
        structure: dict[str, Any],
        dim: int = 128,
        pooling: PoolMode = "attention",
        expert_dropout: float = 0.0,
        fusion: FusionMode = "reliability",
        aux_heads: bool = False,
        aux_entropy_scores: bool = False,
        hidden_dim: int = 64,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_structure(structure)
        if aux_entropy_scores and not aux_heads:
            raise ValueError("aux_entropy_scores needs aux_heads: true")
        if aux_entropy_scores and fusion != "reliability":
            raise ValueError("aux_entropy_scores feeds the reliability scores: needs fusion: reliability")
        self.structure = structure
        self.inputs: list[dict[str, Any]] = list(structure["inputs"])
        self.input_names = [spec["name"] for spec in self.inputs]
        self.task: str = structure["task"]
        num_labels = len(structure["label_names"])
        self.aux_entropy_scores = aux_entropy_scores
        self.pools = nn.ModuleDict()
        self.tabular = nn.ModuleDict()
        self.embeds = nn.ModuleDict()
        for spec in self.inputs:
            if spec["kind"] == "image" and spec["modality"] not in self.pools:
                self.pools[spec["modality"]] = ExpertPooling(
                    structure["expert_dims"][spec["modality"]], dim, pooling,
                    expert_dropout=expert_dropout)
            elif spec["kind"] == "tabular":
                self.tabular[spec["name"]] = TabularEncoder(
                    int(spec.get("num_numeric", 0)), dim, spec.get("cardinalities", []),
                    hidden_dim=hidden_dim)
            elif spec["kind"] == "embedding":
                self.embeds[spec["name"]] = nn.Sequential(nn.Linear(int(spec["dim"]), dim),
                                                          nn.LayerNorm(dim))
        self.fusion = InputFusion(len(self.inputs), dim, fusion, hidden_dim=hidden_dim)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, num_labels))
        self.aux = nn.ModuleDict({n: nn.Linear(dim, num_labels) for n in self.input_names}) \
            if aux_heads else None

    def encode_inputs(
        self, inputs: dict[str, Any], present: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """B x M x dim per-input embeddings ``z_m`` and the expert attention of image inputs.

        ``inputs[name]``: image -> list of K expert feature tensors (B x D_k); tabular -> dict
        with ``numeric``, ``numeric_present``, ``categorical``; embedding -> B x D. Entries of
        absent inputs may hold anything (NaN included)."""
        zs: list[torch.Tensor] = []
        attention: dict[str, torch.Tensor] = {}
        for m, spec in enumerate(self.inputs):
            name, here = spec["name"], present[:, m]
            if name not in inputs:
                raise ValueError(f"input {name!r} missing from the batch (has {sorted(inputs)})")
            value = inputs[name]
            if spec["kind"] == "image":
                pooled = self.pools[spec["modality"]](list(value), here)
                if pooled.weights is not None:
                    attention[name] = pooled.weights
                zs.append(pooled.embedding)
            elif spec["kind"] == "tabular":
                zs.append(self.tabular[name](value.get("numeric"), value.get("numeric_present"),
                                             value.get("categorical")))
            else:
                safe = torch.where(here[:, None], value, torch.zeros((), dtype=value.dtype,
                                                                     device=value.device))
                zs.append(self.embeds[name](safe))
        return torch.stack(zs, dim=1), attention

    def forward(self, inputs: dict[str, Any], present: torch.Tensor) -> NetOutput:
        """Logits of a batch: ``present`` is B x M bool in ``input_names`` order."""
        z, attention = self.encode_inputs(inputs, present)
        aux: dict[str, torch.Tensor] = {}
        score_bias = None
        if self.aux is not None:
            aux = {n: self.aux[n](z[:, m]) for m, n in enumerate(self.input_names)}
            if self.aux_entropy_scores:
                stacked = torch.stack([aux[n].detach() for n in self.input_names], dim=1)
                if self.task == "multilabel":
                    entropy = binary_entropy(stacked)
                else:
                    logp = F.log_softmax(stacked, dim=-1)
                    entropy = -(logp.exp() * logp).sum(dim=-1)
                score_bias = -entropy
        fused = self.fusion(z, present, score_bias)
        return NetOutput(self.head(fused.fused), z, fused.weights, attention, aux)
