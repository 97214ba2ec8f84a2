"""Multi-label classification (NIH ChestX-ray14, CheXpert): BCE-with-logits; per-label and
macro AUC (docs/papers/m-idol.md, 'Downstream protocol')."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from midol.tasks.base import FinetuneModule, FinetuneModuleOptions
from midol.tasks.classification import LinearHead
from midol.tasks.task_metrics import multilabel_metrics


class MultiLabelModuleOptions(FinetuneModuleOptions, Protocol):
    """``self.hparams`` of :class:`MultiLabelModule`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    num_labels: int
    label_names: list[str] | None
    pos_weight: list[float] | None
    head_norm: bool
    head_dropout: float
    head_init_std: float


class MultiLabelModule(FinetuneModule):
    """One sigmoid output per label on pooled backbone features.

    Args:
        num_labels: number of labels (checked against the datamodule).
        label_names: names used in per-label metric keys (default: the datamodule's).
        pos_weight: optional BCE positive weight per label (imbalanced labels).
        head_norm: BatchNorm (no affine) before the linear head, as MAE's linear probe.
        head_dropout: dropout before the linear head.
        head_init_std: std of the head's truncated-normal initialisation.
        **kwargs: backbone, optimiser and schedule arguments of :class:`FinetuneModule`
            (the paper: SGD, momentum 0.9, cosine, 50 warm-up steps).
    """

    monitor = "val/auc"
    monitor_mode = "max"
    prediction = "sigmoid"

    if TYPE_CHECKING:

        @property
        def hparams(self) -> MultiLabelModuleOptions: ...  # type: ignore[override]

    def __init__(
        self,
        num_labels: int,
        label_names: list[str] | None = None,
        pos_weight: list[float] | None = None,
        head_norm: bool = False,
        head_dropout: float = 0.0,
        head_init_std: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if pos_weight is not None and len(pos_weight) != num_labels:
            raise ValueError(f"pos_weight has {len(pos_weight)} entries for {num_labels} labels")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names is not None else None
        self.head = LinearHead(self.backbone.num_features, num_labels, head_norm, head_dropout, head_init_std)
        self.register_buffer(
            "pos_weight", torch.tensor(pos_weight) if pos_weight is not None else None, persistent=False
        )
        self.init_metrics(lambda: multilabel_metrics(num_labels))

    def heads(self) -> list[nn.Module]:
        return [self.head]

    def decode(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def check_datamodule(self, datamodule: Any) -> None:
        if getattr(datamodule, "task", "multilabel") != "multilabel":
            raise ValueError("MultiLabelModule needs a datamodule with task: multilabel")
        n = getattr(datamodule, "num_classes", None)
        if n is not None and n != self.num_labels:
            raise ValueError(f"model.num_labels={self.num_labels} but the data have {n} labels")
        if self.label_names is None and getattr(datamodule, "classes", None):
            self.label_names = list(datamodule.classes)

    def metric_names(self, name: str) -> list[str] | None:
        return self.label_names

    def output_names(self) -> list[str] | None:
        return self.label_names

    def set_output_names(self, names: list[str]) -> None:
        if len(names) == self.num_labels:
            self.label_names = list(names)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=self.pos_weight)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
        metrics.update(logits.float().sigmoid(), target.long())
