"""Group-level classification: every image of a group (a patient's two eyes, a volume's slices)
is encoded by the backbone, the embeddings are pooled into one (mean, or gated attention-MIL of
Ilse et al. 2018, eq. 9: :mod:`midol.models.mil`) and one linear head predicts the group's label.

Batches come from :class:`~midol.data.bags.BagDataModule`: ``image`` uint8 ``(B, M, 3, S, S)``
padded with zero images, ``mask`` ``(B, M)`` True for real ones. Only the real images go through
the backbone. The backbone is frozen (``linear_probe: true``: the pooling and the head learn) or
fine-tuned, with the optimiser, schedules and layer decay of
:class:`~midol.tasks.base.FinetuneModule`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from midol.models.mil import AttentionMIL, MeanPool
from midol.tasks.base import FinetuneModule, FinetuneModuleOptions
from midol.tasks.classification import LinearHead, NamedClasses
from midol.tasks.task_metrics import classification_metrics, multilabel_metrics

Pooling = Literal["mean", "attention"]


class GroupClassificationModuleOptions(FinetuneModuleOptions, Protocol):
    """``self.hparams`` of :class:`GroupClassificationModule`: its ``__init__`` arguments, typed."""

    num_classes: int
    task: Literal['multiclass', 'multilabel']
    pooling: Literal['mean', 'attention']
    attention_hidden: int
    gated: bool
    head_dropout: float
    class_names: list[str] | None


class GroupClassificationModule(NamedClasses, FinetuneModule):
    """One prediction per bag of images.

    Args:
        num_classes: Classes (``multiclass``: softmax, cross-entropy) or labels
            (``multilabel``: sigmoid, BCE); checked against the datamodule.
        task: ``multiclass`` or ``multilabel``.
        pooling: ``mean`` (the mean of the real images' embeddings) or ``attention`` (gated
            attention-MIL, Ilse et al. 2018 eq. 9).
        attention_hidden: Width of the attention MLP (the paper: 128).
        gated: The sigmoid gate of eq. 9 (False: eq. 8).
        head_dropout: Dropout before the linear head.
        class_names: Names in metric keys (default: the datamodule's classes).
        **kwargs: Backbone, optimiser and schedule arguments of :class:`FinetuneModule`
            (``cache_features`` is not available: a bag is not one image).
    """

    monitor = "val/auc"
    monitor_mode = "max"

    if TYPE_CHECKING:

        @property
        def hparams(self) -> GroupClassificationModuleOptions: ...  # type: ignore[override]

    def __init__(
        self,
        num_classes: int,
        task: Literal["multiclass", "multilabel"] = "multiclass",
        pooling: Literal["mean", "attention"] = "attention",
        attention_hidden: int = 128,
        gated: bool = True,
        head_dropout: float = 0.0,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        if num_classes < (2 if task == "multiclass" else 1):
            raise ValueError(f"num_classes must be >= {2 if task == 'multiclass' else 1} for {task}, got {num_classes}")
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        if self.hparams.cache_features:
            raise ValueError("cache_features caches one image per sample; a group task's sample is a bag: turn it off")
        self.num_classes = num_classes
        self.task = task
        self.prediction = "softmax" if task == "multiclass" else "sigmoid"
        self.class_names = list(class_names) if class_names is not None else None
        width: Any = self.backbone.num_features  # timm's attribute (typed as a module attribute)
        dim = int(width)
        self.pool: nn.Module = (AttentionMIL(dim, attention_hidden, gated) if pooling == "attention"
                                else MeanPool())
        self.head = LinearHead(dim, num_classes, False, head_dropout, 0.01)
        make = classification_metrics if task == "multiclass" else multilabel_metrics
        self.init_metrics(lambda: make(num_classes))

    def heads(self) -> list[nn.Module]:
        return [self.pool, self.head]

    def embed_bags(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, M, D)`` embeddings of normalised ``(B, M, 3, S, S)`` bags; zeros where padded
        (padding never reaches the backbone)."""
        if x.ndim != 5 or mask.shape != x.shape[:2]:
            raise ValueError(f"bags must be (B, M, 3, S, S) with a (B, M) mask, got {tuple(x.shape)} "
                             f"and {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        real = x[mask]
        if self.hparams.linear_probe:
            with torch.no_grad():
                feats = self.encode(real)
        else:
            feats = self.encode(real)
        bags = feats.new_zeros((*mask.shape, feats.shape[-1]))
        bags[mask] = feats
        return bags

    def logits_and_weights(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` and the pooling weights ``(B, M)`` of normalised bags."""
        pooled, weights = self.pool(self.embed_bags(x, mask), mask)
        return self.head(pooled), weights

    def _batch_logits(self, stage: str, x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if "mask" not in batch:
            raise ValueError("a group batch needs 'mask' (use midol.data.bags.BagDataModule)")
        return self.logits_and_weights(x, batch["mask"])[0]

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Logits of uint8 bags ``(B, M, 3, H, W)`` (``mask`` None: every image is real)."""
        if mask is None:
            mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return self.logits_and_weights(self.normalizer(images), mask)[0]

    @torch.no_grad()
    def attention(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, M)`` weight of each image in its bag's prediction (mean: uniform)."""
        if mask is None:
            mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return self.logits_and_weights(self.normalizer(images), mask)[1]

    def check_datamodule(self, datamodule: Any) -> None:
        task = getattr(datamodule, "task", None)
        if task is not None and task != self.task:
            raise ValueError(f"model.task={self.task!r} but the datamodule's task is {task!r}")
        self.check_classes(datamodule)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor:
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
        if self.task == "multilabel":
            metrics.update(logits.float().sigmoid(), target.long())
        else:
            metrics.update(logits.float().softmax(dim=-1), target)
