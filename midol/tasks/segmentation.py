"""Semantic segmentation: a decoder over the backbone's stage maps, Dice + cross-entropy loss;
Dice and IoU over the foreground classes (docs/papers/m-idol.md, 'Downstream protocol')."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from midol.models.seg_decoder import MultiScaleDecoder, stage_channels, stage_indices, stage_maps
from midol.models.unetr_decoder import UNETRDecoder
from midol.tasks.base import FinetuneModule, FinetuneModuleOptions
from midol.tasks.task_metrics import segmentation_metrics


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean_c (2 sum p_c t_c + s) / (sum p_c + sum t_c + s)`` over the foreground classes
    c >= 1, summed over the whole batch; pixels equal to ``ignore_index`` are left out."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = (target != ignore_index).unsqueeze(1)
    onehot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), num_classes).permute(0, 3, 1, 2)
    probs, onehot = probs * valid, onehot.float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice[1:].mean()


class UPerNetHead(nn.Module):
    """segmentation_models_pytorch's ``UPerNetDecoder`` (Xiao et al. 2018: PSP on the coarsest map,
    FPN fusion) over 4 stage maps, then dropout, a 1x1 classifier and bilinear upsampling to the
    input. smp expects 6 maps from 1/1 to 1/32 and uses the last 4: a hierarchical backbone has
    only those 4, so the finest is passed in the two unused places. On frozen demo-teacher
    features of PH2 its per-image Dice is level with midol's lighter ``fpn`` head (0.869 vs
    0.878 over 3 seeds, within the seeds' spread; ``experiments/results/
    library_choices_2026-12-08.md``) with 3.6x the parameters: an option for paper parity."""

    def __init__(self, in_channels: list[int], num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"decoder_type: upernet takes 4 stage maps (num_levels: 4), got {len(in_channels)}")
        try:
            from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
        except ImportError as err:
            raise ImportError("decoder_type: upernet needs segmentation_models_pytorch: "
                              "pip install 'midol[seg]'") from err
        first = in_channels[0]
        self.decoder = UPerNetDecoder([first, first, *in_channels], encoder_depth=5, decoder_channels=dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        fused = self.decoder([features[0], features[0], *features])
        logits = self.classifier(self.dropout(fused))
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


class SegmentationModuleOptions(FinetuneModuleOptions, Protocol):
    """``self.hparams`` of :class:`SegmentationModule`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    num_classes: int
    decoder_dim: int
    decoder_dropout: float
    num_levels: int
    ce_weight: float
    dice_weight: float
    ignore_index: int
    select_metric: Literal['dice', 'dice_per_image']
    decoder_type: Literal['fpn', 'unetr', 'upernet']


class SegmentationModule(FinetuneModule):
    """Per-pixel classes from the backbone's multi-scale features.

    Args:
        num_classes: classes including background (binary masks: 2).
        decoder_dim: channels of the decoder.
        decoder_dropout: dropout before the per-pixel classifier.
        num_levels: how many stage maps feed the decoder (Swin: 4; ViT-B: blocks 3/6/9/12).
        decoder_type: ``fpn`` (the light multi-scale fusion, any backbone) or ``unetr`` (a
            UNETR-style decoder for plain ViTs, as DEX's supplement uses; ``decoder_dim`` is
            the width of its full-resolution stage and doubles per coarser stage, so use ~32
            there, not the FPN's 256); or ``upernet``: segmentation_models_pytorch's
            ``UPerNetDecoder`` (PSP + FPN, the head the M-IDoL paper used through mmsegmentation;
            4 stage maps of a hierarchical backbone; ``pip install 'midol[seg]'``).
        ce_weight: weight of the cross-entropy term (loss = ce_weight * CE + dice_weight * (1 - soft Dice)).
        dice_weight: weight of the soft-Dice term.
        ignore_index: target value left out of loss and metrics (checked against the data).
        select_metric: the validation metric that picks the best checkpoint: ``dice`` (pooled
            over all pixels) or ``dice_per_image`` (per image, empty-mask rule; the paper's
            comparisons). Both are always logged.
        **kwargs: backbone, optimiser and schedule arguments of :class:`FinetuneModule`
            (the paper: AdamW, wd 0.05, layer decay 0.65, poly, 1500 warm-up iterations).
    """

    monitor = "val/dice"
    monitor_mode = "max"

    if TYPE_CHECKING:

        @property
        def hparams(self) -> SegmentationModuleOptions: ...  # type: ignore[override]

    def __init__(
        self,
        num_classes: int = 2,
        decoder_dim: int = 256,
        decoder_dropout: float = 0.1,
        num_levels: int = 4,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        ignore_index: int = 255,
        select_metric: Literal["dice", "dice_per_image"] = "dice",
        decoder_type: Literal["fpn", "unetr", "upernet"] = "fpn",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if select_metric not in ("dice", "dice_per_image"):
            raise ValueError(f"select_metric must be 'dice' or 'dice_per_image', got {select_metric!r}")
        self.monitor = f"val/{select_metric}"
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError("ce_weight and dice_weight must be >= 0, not both 0")
        if self.hparams.cache_features:
            raise ValueError("cache_features is for pooled features (classification), not stage maps")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.stage_ids = stage_indices(self.backbone, num_levels)
        channels = stage_channels(self.backbone, self.stage_ids)
        if decoder_type == "unetr":
            patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
            if patch is None or getattr(self.backbone, "layers", None) is not None:
                raise ValueError("decoder_type: unetr needs a plain ViT backbone (one patch size); "
                                 "use decoder_type: fpn for Swin, ConvNeXt, ResNet")
            self.decoder: nn.Module = UNETRDecoder(channels, num_classes, int(patch[0]), decoder_dim,
                                                   decoder_dropout)
        elif decoder_type == "fpn":
            self.decoder = MultiScaleDecoder(channels, num_classes, decoder_dim, decoder_dropout)
        elif decoder_type == "upernet":
            self.decoder = UPerNetHead(channels, num_classes, decoder_dim, decoder_dropout)
        else:
            raise ValueError(f"decoder_type must be 'fpn', 'unetr' or 'upernet', got {decoder_type!r}")
        self.init_metrics(lambda: segmentation_metrics(num_classes, ignore_index))

    def heads(self) -> list[nn.Module]:
        return [self.decoder]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return stage_maps(self.backbone, x, self.stage_ids)

    def decode(self, features: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.decoder, UNETRDecoder):
            return self.decoder(features, x)
        return self.decoder(features, x.shape[-2:])

    def check_datamodule(self, datamodule: Any) -> None:
        for name in ("num_classes", "ignore_index"):
            theirs = getattr(datamodule, name, None)
            if theirs is not None and theirs != getattr(self, name):
                raise ValueError(f"model.{name}={getattr(self, name)} but data.{name}={theirs}")

    def per_class_values(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value[1:]  # foreground classes

    def loss(self, logits: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor:
        h = self.hparams
        loss = logits.new_zeros((), dtype=torch.float32)
        if h.ce_weight:
            loss = loss + h.ce_weight * F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        if h.dice_weight:
            loss = loss + h.dice_weight * soft_dice_loss(logits, target, self.ignore_index)
        return loss

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
        metrics.update(logits.argmax(dim=1), target)
