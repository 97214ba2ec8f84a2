"""Shared base of the downstream LightningModules (docs/papers/m-idol.md, 'Downstream
protocol'): backbone loading, linear probing vs full fine-tuning with layer-wise lr decay,
warm-up + cosine/poly schedules, per-stage metrics.

Subclasses (classification, multi-label, segmentation) add a head, a loss and their metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric, MetricCollection

from midol.data.normalize import PixelNormalizer
from midol.optim.layer_decay import layer_decay_param_groups
from midol.optim.schedules import poly_schedule, warmup_cosine_schedule
from midol.tasks.backbones import CheckpointFormat, load_backbone, part_from_prefix, with_dex_layers
from midol.tasks.stage_metrics import StageMetrics
from midol.utils.dist import world_size
from midol.utils.hparams import HParams
from midol.utils.run_logs import record_log_dirs, recorded_log_dirs

Schedule = Literal["cosine", "poly"]
# Top-level checkpoint key: what inference needs without the training config (``midol predict``):
# {"prediction": "softmax" | "sigmoid" | None, "output_names": [...] | None, "image_size": int |
#  None, "backbone": {"model": timm name, "overrides": {...}, "dex": {...} | None}}
TASK_KEY = "midol_task"


class FinetuneModuleOptions(HParams, Protocol):
    """``self.hparams`` of :class:`FinetuneModule`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    backbone: str | None
    backbone_kwargs: dict[str, Any] | None
    init_checkpoint: str | None
    init_format: CheckpointFormat
    init_part: str | None
    init_prefix: str | None
    dex_mode: Literal['director', 'experts'] | None
    grad_checkpointing: bool
    linear_probe: bool
    optimizer: Literal['adamw', 'sgd']
    lr: float
    scale_lr_by_batch: bool
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    momentum: float
    layer_decay: float
    schedule: Schedule
    warmup_epochs: float
    warmup_steps: int | None
    poly_power: float
    cache_features: bool


class FinetuneModule(L.LightningModule):
    """Backbone + task head trained on labelled images.

    Shared by every downstream task.

    Args:
        backbone: timm model name. Leave null with a midol checkpoint or an exported backbone
            (the architecture is read from the file); required otherwise.
        backbone_kwargs: extra ``timm.create_model`` keywords (e.g. ``drop_path_rate: 0.1``; a
            tiny Swin for tests); added to the architecture recorded in the checkpoint.
        init_checkpoint: the backbone's weights: (a) a midol pre-training ``.ckpt`` (teacher
            backbone), (b) an exported ``teacher_backbone.safetensors`` (with its ``.json``),
            (c) local weights of a timm model, or null for random initialisation.
        init_format: ``auto`` (by file name), ``midol``, ``exported`` or ``timm``.
        init_part: Which backbone of a midol training checkpoint: a name its method exports
            (M-IDoL: ``teacher_backbone``, the default, or ``student_backbone``; DEX:
            ``director_backbone``, the default, or ``experts_backbone``); None takes the
            method's first.
        dex_mode: For a DEX backbone: ``director`` (the dense director-only ViT) or
            ``experts`` (the routed experts, top-k per image, no routing noise); None: the
            file's own (a DEX checkpoint's default is ``director``). A clear error when the
            weights are not DEX's or do not hold that mode.
        init_prefix: Deprecated spelling of ``init_part`` (midol <= 0.1.0): the state-dict
            prefix ``teacher.backbone.`` or ``student.backbone.``.
        grad_checkpointing: activation checkpointing in the backbone.
        linear_probe: freeze the backbone (no gradients, eval mode, no layer decay) and train
            the head only; otherwise full fine-tuning.
        optimizer: ``adamw`` or ``sgd`` (momentum ``momentum``).
        lr: peak learning rate of the head (after warm-up).
        scale_lr_by_batch: use ``lr * total_batch / 256`` as the peak (MAE/RETFound ``blr``).
        min_lr: final learning rate of the schedule.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay; not on norms/biases/position
            tables.
        betas: AdamW betas.
        momentum: SGD momentum.
        layer_decay: layer-wise lr decay factor (1 = off): layer ``i`` of ``n`` learns at
            ``lr * layer_decay ** (n - 1 - i)``.
        schedule: ``cosine`` (classification) or ``poly`` (segmentation), after warm-up.
        warmup_epochs: linear warm-up length in epochs.
        warmup_steps: linear warm-up length in optimiser steps (wins over ``warmup_epochs`` when set).
        poly_power: exponent of the poly schedule.
        cache_features: linear probing only: keep each image's backbone features after their
            first computation and reuse them in later epochs (exact when the training
            transform is deterministic, which is checked: set ``data.train_augment: false``).
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    # How the logits of one image become its prediction (``midol predict``): ``softmax`` (one
    # class), ``sigmoid`` (independent labels), None (no per-image prediction: segmentation).
    prediction: str | None = None

    if TYPE_CHECKING:

        @property
        def hparams(self) -> FinetuneModuleOptions: ...  # type: ignore[override]  # Lightning types it as a plain mapping

    def __init__(
        self,
        backbone: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        init_format: CheckpointFormat = "auto",
        init_part: str | None = None,
        init_prefix: str | None = None,
        dex_mode: Literal["director", "experts"] | None = None,
        grad_checkpointing: bool = False,
        linear_probe: bool = False,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        scale_lr_by_batch: bool = False,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        layer_decay: float = 1.0,
        schedule: Schedule = "cosine",
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        poly_power: float = 1.0,
        cache_features: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._validate_common()
        self.backbone, self.backbone_info = load_backbone(
            backbone, backbone_kwargs, init_checkpoint, init_format,
            init_part or part_from_prefix(init_prefix), grad_checkpointing, dex_mode,
        )
        if linear_probe:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.normalizer = PixelNormalizer()
        self._steps_per_epoch = 1
        self._total_steps = 1
        self._peak_lr = lr
        self._feature_cache: dict[str, dict[int, Any]] = {}
        self._input_size: int | None = None  # the datamodule's image_size, recorded at setup
        self._resumed_log_dirs: list[str] = []

    def _validate_common(self) -> None:
        h = self.hparams
        if h.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {h.optimizer!r}")
        if h.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule must be 'cosine' or 'poly', got {h.schedule!r}")
        if not h.lr > 0:
            raise ValueError(f"lr must be > 0, got {h.lr}")
        if not 0 < h.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {h.layer_decay}")
        if h.warmup_epochs < 0 or (h.warmup_steps is not None and h.warmup_steps < 0):
            raise ValueError("warm-up length must be >= 0")
        if h.cache_features and not h.linear_probe:
            raise ValueError("cache_features needs linear_probe: true (a trained backbone changes its features)")

    # ------------------------------------------------------------------ subclass API
    def heads(self) -> list[nn.Module]:
        """Modules trained on top of the backbone (learn at the full lr)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Any:
        """Backbone features of normalised images (pooled by default)."""
        return self.backbone(x)

    def decode(self, features: Any, x: torch.Tensor) -> torch.Tensor:
        """Task logits from the features."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor:
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def augment(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch-level training augmentation on normalised images; returns (x, target, mixed)."""
        return x, target, False

    def init_metrics(self, make: Callable[[], dict[str, Metric]]) -> None:
        """``make()`` returns a fresh ``{name: Metric}``; one collection per stage."""
        self.stage_metrics = StageMetrics(make)

    def metric_names(self, name: str) -> list[str] | None:
        """Names of the entries of a per-class metric vector (None: numbered)."""
        return None

    # ------------------------------------------------------------------ model
    def train(self, mode: bool = True) -> FinetuneModule:
        super().train(mode)
        if self.hparams.linear_probe:
            self.backbone.eval()  # frozen: no dropout/drop-path, no norm statistics updates
        return self

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.linear_probe:
            with torch.no_grad():
                features = self.encode(x)
        else:
            features = self.encode(x)
        return self.decode(features, x)

    def _batch_logits(self, stage: str, x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a batch of normalised images, through the feature cache when it is on."""
        if not self.hparams.cache_features:
            return self.forward_normalized(x)
        store = self._feature_cache.setdefault(stage, {})
        keys = batch["index"].tolist()
        if all(k in store for k in keys):
            features = torch.stack([store[k] for k in keys])
        else:
            with torch.no_grad():
                features = self.encode(x)
            store.update(zip(keys, features.detach()))
        return self.decode(features, x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of uint8 ``B x 3 x H x W`` images."""
        return self.forward_normalized(self.normalizer(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 images."""
        return self.backbone(self.normalizer(images))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        groups = layer_decay_param_groups(
            self.backbone, self.heads(), h.weight_decay, 1.0 if h.linear_probe else h.layer_decay
        )
        if h.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum)
        return torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas))

    def on_train_start(self) -> None:
        trainer = self.trainer
        self._steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_epochs or trainer.max_steps: the lr schedule needs a length")
        self._total_steps = max(1, int(total))
        self._peak_lr = self.hparams.lr
        if self.hparams.scale_lr_by_batch:
            batch = getattr(trainer.datamodule, "batch_size", None)
            if batch is None:
                raise ValueError("scale_lr_by_batch needs a datamodule with a batch_size attribute")
            self._peak_lr *= batch * world_size() * trainer.accumulate_grad_batches / 256

    def warmup_length(self) -> int:
        h = self.hparams
        if h.warmup_steps is not None:
            return h.warmup_steps
        return int(round(h.warmup_epochs * self._steps_per_epoch))

    def lr_at(self, step: int) -> float:
        """Learning rate of the head (scale 1) at optimiser step ``step``."""
        h = self.hparams
        warmup = min(self.warmup_length(), self._total_steps)
        if h.schedule == "poly":
            return poly_schedule(step, self._total_steps, warmup, self._peak_lr, h.min_lr, h.poly_power)
        return warmup_cosine_schedule(step, self._total_steps, warmup, self._peak_lr, h.min_lr)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = self.lr_at(self.global_step)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        self.log("train/lr", lr, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        self.check_datamodule(datamodule)
        size = getattr(datamodule, "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            self._input_size = size
        if self.hparams.cache_features and getattr(datamodule, "train_augment", False):
            raise ValueError(
                "cache_features reuses the first epoch's features, which is only exact without "
                "random training augmentation: set data.train_augment: false"
            )

    def check_datamodule(self, datamodule: Any) -> None:
        """Subclasses compare their settings with the datamodule's (clear error on mismatch)."""

    # ------------------------------------------------------------------ inference settings
    def output_names(self) -> list[str] | None:
        """Names of the outputs (classes, labels), when known."""
        return None

    def set_output_names(self, names: list[str]) -> None:
        """Restore the output names a checkpoint records (subclasses with names store them)."""

    def input_size(self) -> int | None:
        """Side of the square input the model was trained on: the datamodule's
        ``image_size``, else the size the backbone's weights record."""
        if self._input_size is not None:
            return self._input_size
        size = self.backbone_info.image_size
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    def task_settings(self) -> dict[str, Any]:
        """What :data:`TASK_KEY` records: prediction rule, output names, input size and the
        backbone's timm recipe (so inference rebuilds the architecture without re-reading
        ``init_checkpoint``)."""
        info = self.backbone_info
        return {"prediction": self.prediction, "output_names": self.output_names(),
                "image_size": self.input_size(),
                "backbone": {"model": info.model, "overrides": dict(info.overrides), "dex": info.dex}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["midol_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[TASK_KEY] = self.task_settings()
        if self._trainer is not None:
            record_log_dirs(checkpoint, self._trainer, self._resumed_log_dirs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_log_dirs = recorded_log_dirs(checkpoint)
        self.restore_task_settings(checkpoint)

    def restore_task_settings(self, checkpoint: dict[str, Any]) -> None:
        """Output names and input size from a checkpoint's :data:`TASK_KEY`, where the module
        does not know them itself (no datamodule has set them)."""
        task = checkpoint.get(TASK_KEY) or {}
        names = task.get("output_names")
        if self.output_names() is None and names:
            self.set_output_names([str(n) for n in names])
        size = task.get("image_size")
        if self._input_size is None and isinstance(size, int):
            self._input_size = size

    @classmethod
    def inference_arguments(cls, checkpoint: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments that rebuild ``checkpoint``'s architecture for inference
        (:func:`midol.methods.loading.load_method`): the backbone recipe it records, random
        weights (the state dict holds the trained ones), no ``init_checkpoint`` read. A
        checkpoint written before the recipe was recorded keeps its ``init_checkpoint`` when
        that file names the architecture (``backbone`` null)."""
        recipe = (checkpoint.get(TASK_KEY) or {}).get("backbone")
        if not recipe:
            hparams = checkpoint.get("hyper_parameters") or {}
            if kwargs.get("backbone") is None and hparams.get("init_checkpoint"):
                return {**kwargs, "init_checkpoint": hparams["init_checkpoint"]}
            return kwargs
        return {**kwargs, "backbone": recipe["model"], "backbone_kwargs": dict(recipe.get("overrides") or {}),
                "init_checkpoint": None, "init_format": "timm", "init_part": None,
                "init_prefix": None, "dex_mode": None}

    def prepare_for_weights(self, checkpoint: dict[str, Any]) -> None:
        """Before ``load_state_dict`` of an :meth:`inference_arguments` rebuild: the DEX
        layers the recipe records, and the recorded output names and input size."""
        recipe = (checkpoint.get(TASK_KEY) or {}).get("backbone") or {}
        if recipe.get("dex") and self.backbone_info.dex is None:
            self.backbone = with_dex_layers(self.backbone, recipe["dex"])
            self.backbone_info.dex = recipe["dex"]
        self.restore_task_settings(checkpoint)

    def _metrics(self, stage: str) -> MetricCollection:
        return self.stage_metrics.of(stage)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = self.normalizer(batch["image"])
        x, target, mixed = self.augment(x, batch["target"])
        logits = self._batch_logits("train", x, batch)
        loss = self.loss(logits, target, train=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}")
        if not mixed:
            self.update_metrics(self._metrics("train"), logits.detach(), batch["target"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> torch.Tensor:
        logits = self._batch_logits(stage, self.normalizer(batch["image"]), batch)
        loss = self.loss(logits, batch["target"], train=False)
        self.update_metrics(self._metrics(stage), logits, batch["target"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val",
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def stage_results(self, stage: str) -> dict[str, float]:
        """Compute and reset the stage's metrics: scalars as they are, per-class vectors as
        ``name_<class>`` plus their macro mean (undefined entries left out) under ``name``."""
        return self.stage_metrics.results(stage, names_of=self.metric_names,
                                          macro_values=self.per_class_values)

    def per_class_values(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Entries of a per-class metric that enter its macro mean (segmentation: foreground)."""
        return value

    def _log_stage(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            # two sanity batches lack most classes: their "undefined" warnings would be false
            self.stage_metrics.of(stage).reset()
            return
        results = self.stage_results(stage)
        if results:
            # the number that selects checkpoints goes on the progress bar
            shown = {k: v for k, v in results.items() if k == self.monitor}
            rest = {k: v for k, v in results.items() if k != self.monitor}
            if shown:
                self.log_dict(shown, on_epoch=True, prog_bar=True)
            if rest:
                self.log_dict(rest, on_epoch=True, prog_bar=False)

    def on_fit_end(self) -> None:
        """One line with the best checkpoint's score, epoch and path; a warning when the run
        ended without any validated checkpoint (e.g. validation every 5 epochs, 3 epochs run)."""
        report_best_checkpoint(self)

    def on_train_epoch_end(self) -> None:
        self._log_stage("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")


def report_best_checkpoint(module: L.LightningModule) -> None:
    """Print :func:`best_checkpoint_report` at the end of a fit (rank 0); its warning as one."""
    if module._trainer is None or not module.trainer.is_global_zero:
        return
    report = best_checkpoint_report(module.trainer)
    if report is None:
        return
    if report.startswith("warning: "):
        rank_zero_warn(report[len("warning: "):])
    else:
        print(report)


def best_checkpoint_report(trainer: Any) -> str | None:
    """``best <monitor> = <score> at epoch <e>: <path>`` for each ModelCheckpoint that
    monitors a metric; ``warning: ...`` when none of them saved a validated checkpoint; None
    without such a callback."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
    if not checkpoints:
        return None
    lines = []
    for cb in checkpoints:
        if cb.best_model_path and cb.best_model_score is not None:
            epoch = _checkpoint_epoch(cb.best_model_path)
            where = f" at epoch {epoch}" if epoch is not None else ""
            lines.append(f"best {cb.monitor} = {float(cb.best_model_score):.4f}{where}: {cb.best_model_path}")
    if not lines:
        monitors = ", ".join(sorted({cb.monitor for cb in checkpoints}))
        return (f"warning: the run ended without a validated checkpoint ({monitors} was never "
                f"computed: {trainer.current_epoch} epoch(s) run, validation every "
                f"{trainer.check_val_every_n_epoch} epoch(s)); lower check_val_every_n_epoch or "
                "train longer")
    return "\n".join(lines)


def _checkpoint_epoch(path: str) -> int | None:
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch")
    except (OSError, RuntimeError, ValueError, AttributeError):  # vanished or another format
        return None
    return epoch if isinstance(epoch, int) else None
