"""The base of every midol method (in the style of solo-learn's ``BaseMethod``).

Everything generic lives here once: schedules as functions of the global step, AdamW with
no-decay groups, global or per-parameter gradient clipping, device-side scalars for logging,
per-batch RNG seeding for exact resume, the non-finite-loss policy, skipped-image accounting,
optional ``torch.compile``, and the hook that runs after each real optimiser step. A method adds
its networks, its ``training_step`` and what it exports.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Protocol

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from midol.data.image_io import UnreadableImageWarning
from midol.data.normalize import PixelNormalizer
from midol.methods.validation import raise_on_failed
from midol.optim.clipping import clip_grad_norm_per_param
from midol.optim.grad_norms import term_grad_norms, total_norm
from midol.optim.param_groups import decay_groups, set_lr_and_wd
from midol.optim.schedules import cosine_schedule, warmup_cosine_schedule
from midol.utils.deferred import DeferredUpdate
from midol.utils.dist import all_reduce_max, rank, world_size
from midol.utils.hparams import HParams
from midol.utils.run_logs import record_log_dirs, recorded_log_dirs

ClipMode = Literal["global", "per_param"]
NonFinite = Literal["raise", "skip"]
NonFiniteCheck = Literal["every_step", "one_step_late"]
CompileSetting = bool | Literal["auto"]


class BaseMethodOptions(HParams, Protocol):
    """``self.hparams`` of :class:`BaseMethod`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    base_lr: float
    lr_batch_size: int
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    betas: tuple[float, float]
    clip_mode: ClipMode
    compile: CompileSetting
    nonfinite: NonFinite
    nonfinite_check: NonFiniteCheck
    max_nonfinite_skips: int
    grad_norm_every: int


class BaseMethod(L.LightningModule):
    """Generic training machinery shared by the pre-training methods.

    Args:
        base_lr: Learning rate per ``lr_batch_size`` images; the peak lr is
            ``base_lr x total batch / lr_batch_size`` (total batch = per-device batch x devices
            x gradient accumulation).
        lr_batch_size: Batch size that ``base_lr`` refers to (256 in DINO and M-IDoL, 512 in MAE).
        min_lr: Final learning rate of the cosine schedule.
        warmup_epochs: Linear lr warm-up length in epochs (may be fractional).
        weight_decay: Weight decay at the start of training (not on biases and norm parameters).
        weight_decay_end: Weight decay at the end (cosine schedule); equal to ``weight_decay``
            for a constant decay.
        betas: AdamW betas.
        clip_mode: How ``trainer.gradient_clip_val`` clips: ``global`` (the norm of all
            gradients together, Lightning's) or ``per_param`` (each parameter tensor's norm, as
            DINO's ``clip_gradients`` and the M-IDoL authors' code).
        compile: ``torch.compile`` the modules the method names (static shapes) when the Trainer
            sets the model up; checkpoint keys are unchanged. ``auto``: compile when the
            Trainer runs on CUDA (the Swin-B presets), eager elsewhere.
        nonfinite: What a NaN/inf loss does: ``raise`` stops with a ``FloatingPointError``
            naming the loss term(s) and the global step; ``skip`` warns and skips that optimiser
            step (no parameter, teacher or optimiser-moment update; the step still counts for
            the schedules). The check reads one bool per step back to the host.
        nonfinite_check: When the flag is read: ``every_step`` (before the step's backward: a
            host sync per step) or ``one_step_late`` (only with ``nonfinite: raise``): the flag
            is copied to pinned memory without blocking and read at the next step, or before a
            checkpoint is written, so the host never waits for the device in a normal step. A
            bad step then has updated the weights once before the run stops, but no checkpoint
            holds that update.
        max_nonfinite_skips: With ``skip``, stop anyway after this many consecutive skipped steps.
        grad_norm_every: Every this many optimiser steps log ``grad/norm_before_clip`` and
            ``grad/norm_after_clip`` (all trainable parameters) and, where the method names
            its loss terms (M-IDoL: L_route, L_cst), each weighted term's gradient norm on the
            backbone (``grad/backbone_<term>``, one extra backward per term on those steps,
            this rank's batch only). 0 = off.
    """

    if TYPE_CHECKING:

        @property
        def hparams(self) -> BaseMethodOptions: ...  # type: ignore[override]  # Lightning types it as a plain mapping

    def __init__(
        self,
        base_lr: float = 1e-4,
        lr_batch_size: int = 256,
        min_lr: float = 1e-8,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        betas: tuple[float, float] = (0.9, 0.95),
        clip_mode: ClipMode = "global",
        compile: CompileSetting = False,
        nonfinite: NonFinite = "raise",
        nonfinite_check: NonFiniteCheck = "every_step",
        max_nonfinite_skips: int = 10,
        grad_norm_every: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._validate_base()
        self.normalizer = PixelNormalizer()
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))
        # Base of the per-batch seed of the global RNG (seed_everything sets it).
        self._rng_base = torch.initial_seed()
        self._nonfinite_streak = 0
        self._pending_check: _PendingCheck | None = None
        self._step_trained = False  # a batch of the current optimiser step had a finite loss
        self._skipped_this_epoch: list[str] = []
        self._skipped_warned: set[str] = set()
        self._steps_per_epoch = 1
        self._total_steps = 1
        # Set by callbacks (the routing monitor) to ask for StepOutput["health"] every n steps.
        self.health_every_n_steps = 0
        # log folders of the run a resumed fit continues (its checkpoints list them first)
        self._resumed_log_dirs: list[str] = []

    def _validate_base(self) -> None:
        h = self.hparams
        checks = [
            ("base_lr", h.base_lr > 0, "> 0"),
            ("lr_batch_size", h.lr_batch_size >= 1, ">= 1"),
            ("min_lr", h.min_lr >= 0, ">= 0"),
            ("warmup_epochs", h.warmup_epochs >= 0, ">= 0"),
            ("weight_decay", h.weight_decay >= 0, ">= 0"),
            ("weight_decay_end", h.weight_decay_end >= 0, ">= 0"),
            ("betas", len(h.betas) == 2 and all(0 <= b < 1 for b in h.betas), "two values in [0, 1)"),
            ("max_nonfinite_skips", h.max_nonfinite_skips >= 0, ">= 0"),
            ("grad_norm_every", h.grad_norm_every >= 0, ">= 0"),
        ]
        raise_on_failed(h, checks)
        for name, allowed_values in (("clip_mode", ("global", "per_param")),
                                     ("nonfinite", ("raise", "skip")),
                                     ("nonfinite_check", ("every_step", "one_step_late")),
                                     ("compile", (True, False, "auto"))):
            if h[name] not in allowed_values:
                raise ValueError(f"{name} must be one of {allowed_values}, got {h[name]!r}")
        if h.nonfinite_check == "one_step_late" and h.nonfinite == "skip":
            raise ValueError("nonfinite_check: one_step_late needs nonfinite: raise (a step can "
                             "only be skipped when its flag is read before its backward)")
        if not all(math.isfinite(float(h[k])) for k in ("base_lr", "min_lr", "weight_decay",
                                                         "weight_decay_end", "warmup_epochs")):
            raise ValueError("base_lr, min_lr, weight_decay(_end) and warmup_epochs must be finite")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._raise_pending_nonfinite()  # never write the update of a non-finite step
        # LightningCLI records the class; a checkpoint from a plain Trainer would otherwise load
        # back as the default method (M-IDoL) in load_method.
        # (a top-level key: ``_class_path`` among the hyper-parameters would reach __init__ in
        # Lightning's own load_from_checkpoint)
        checkpoint["midol_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # the run's CSVLogger folders: `midol analyze` reads this run's metrics.csv, not the
        # newest one in the folder (midol.utils.run_logs)
        if self._trainer is not None:
            record_log_dirs(checkpoint, self._trainer, self._resumed_log_dirs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_log_dirs = recorded_log_dirs(checkpoint)

    # ------------------------------------------------------------------ what a method defines
    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates (no-decay groups are made from them)."""
        raise NotImplementedError

    def compile_targets(self) -> list[nn.Module]:
        """Modules compiled when ``compile: true`` (default: none)."""
        return []

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimiser step ``step`` (0-based) when at least one of its batches
        trained (a skipped step does not call it): the place for EMA updates."""

    def deferred_updates(self) -> list[DeferredUpdate]:
        """State computed in the forward that waits for a good step (the DINO centre, DEX's
        frequencies and director EMA): committed after backward, discarded when the step is
        skipped (:mod:`midol.utils.deferred`). Default: none."""
        return []

    def on_after_backward(self) -> None:
        # backward ran, so the step's loss passed the finite check: apply what it computed
        # (before the optimiser moves the weights, as each update was defined on them)
        for state in self.deferred_updates():
            state.commit()

    def batch_size_of(self, batch: Any) -> int:
        """Images per device in ``batch`` (lr scaling, image counting)."""
        if isinstance(batch, dict):
            if "views" in batch:
                return int(batch["views"][0].shape[0])
            if "image" in batch:
                return int(batch["image"].shape[0])
        raise ValueError("batch_size_of: override it for batches without 'views' or 'image'")

    # ------------------------------------------------------------------ schedules
    def on_train_start(self) -> None:
        trainer = self.trainer
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self._steps_per_epoch = max(1, per_epoch)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_epochs or trainer.max_steps: schedules need a length")
        self._total_steps = max(1, int(total))

    def peak_lr(self, batch_size: int) -> float:
        h = self.hparams
        total_batch = batch_size * world_size() * self.trainer.accumulate_grad_batches
        return float(h.base_lr * total_batch / h.lr_batch_size)

    def lr_at(self, step: int, batch_size: int) -> float:
        h = self.hparams
        warmup = int(h.warmup_epochs * self._steps_per_epoch)
        return warmup_cosine_schedule(step, self._total_steps, min(warmup, self._total_steps),
                                      self.peak_lr(batch_size), h.min_lr)

    def weight_decay_at(self, step: int) -> float:
        h = self.hparams
        return cosine_schedule(step, self._total_steps, h.weight_decay, h.weight_decay_end)

    def epochs_to_steps(self, epochs: float) -> int:
        return int(epochs * self._steps_per_epoch)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        fused = next(self.parameters()).is_cuda
        return torch.optim.AdamW(
            decay_groups(self.trainable_modules()), lr=h.base_lr, betas=tuple(h.betas),
            weight_decay=h.weight_decay, fused=fused,
        )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        measure = self.grad_norm_due()
        per_param = self.hparams.clip_mode == "per_param" and bool(gradient_clip_val)
        # the parameter list only on the steps that need it (every step for per_param)
        params = [p for group in optimizer.param_groups for p in group["params"]] if measure or per_param else []
        if measure:
            before = total_norm(p.grad for p in params)
        if per_param:
            clip_grad_norm_per_param(params, float(gradient_clip_val))
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if measure:
            after = total_norm(p.grad for p in params)
            self.log_dict({"grad/norm_before_clip": before, "grad/norm_after_clip": after},
                          on_step=True, on_epoch=False)

    def grad_norm_due(self) -> bool:
        """Whether this optimiser step measures gradient norms (``grad_norm_every``)."""
        every = int(self.hparams.grad_norm_every)
        return self.training and every > 0 and self.global_step % every == 0

    def log_term_grad_norms(self, terms: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Log each weighted loss term's gradient norm on ``module`` when due (a method calls
        this from ``training_step`` with its terms before returning the loss)."""
        if not (self.grad_norm_due() and torch.is_grad_enabled()):
            return
        params = [p for p in module.parameters() if p.requires_grad]
        norms = term_grad_norms(terms, params)
        self.log_dict({f"grad/backbone_{k}": v for k, v in norms.items()}, on_step=True,
                      on_epoch=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        step = self.global_step  # 0-based index of the step being taken
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        trained, self._step_trained = self._step_trained, False
        if trained:
            self.after_optimizer_step(step)

    def compile_enabled(self) -> bool:
        """``compile`` resolved for this run's device (``auto``: on CUDA only)."""
        setting = self.hparams.compile
        if setting == "auto":
            trainer = self._trainer
            device = trainer.strategy.root_device if trainer is not None else self.device
            return device.type == "cuda"
        return bool(setting)

    def configure_model(self) -> None:
        # Here, not in __init__: runs in every process after launch (a compiled module does not
        # pickle for spawn) and leaves state_dict keys as they are (nn.Module.compile).
        if self.compile_enabled():
            for module in self.compile_targets():
                if getattr(module, "_compiled_call_impl", None) is None:
                    module.compile(dynamic=False)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Stochastic depth and router noise draw from the global RNG; seeding it per batch from
        # (seed, epoch, batch, rank) gives a resumed run the same draws as an uninterrupted one.
        torch.manual_seed(self._batch_seed(self.current_epoch, batch_idx))
        step = self.global_step
        lr = self.lr_at(step, self.batch_size_of(batch))
        wd = self.weight_decay_at(step)
        for optimizer in self.trainer.optimizers:
            set_lr_and_wd(optimizer, lr, wd)
        self.log_dict(self.device_scalars({"train/lr": lr, "train/weight_decay": wd}),
                      on_step=True, on_epoch=False)

    def _batch_seed(self, epoch: int, batch_idx: int) -> int:
        words = np.random.SeedSequence([self._rng_base, epoch, batch_idx, rank()]).generate_state(2)
        return int(words[0]) << 32 | int(words[1])

    def device_scalars(self, values: dict[str, float]) -> dict[str, torch.Tensor]:
        """Python floats as device tensors for ``self.log``, copied without blocking: given a
        float, ``self.log`` makes a blocking host-to-device copy (a host sync per step on CUDA)."""
        host = torch.tensor(list(values.values()), dtype=torch.float32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return dict(zip(values, host.to(self.device, non_blocking=True).unbind()))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) ``B x 3 x H x W`` -> normalised float, on the device."""
        return self.normalizer(images)

    def request_health(self, every_n_steps: int) -> None:
        """:class:`~midol.methods.interfaces.Monitored`: the routing monitor's pace."""
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.health_every_n_steps = every_n_steps

    def health_due(self) -> bool:
        """True on the steps where ``StepOutput["health"]`` is wanted."""
        n = self.health_every_n_steps
        return n > 0 and self.global_step % n == 0

    def log_progress(self, loss: torch.Tensor) -> None:
        """The loss on the progress bar at the logger's pace: progress-bar values are read back
        to the host at the end of every step that logs one (a sync)."""
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(1, every) == 0:
            self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def mark_trained(self, batch_size: int) -> None:
        """Record that this batch trains (its loss was finite): counts its images and lets
        :meth:`after_optimizer_step` run for this optimiser step."""
        self.images_seen += batch_size * world_size()
        self._step_trained = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            for message in batch.get("skipped", ()):
                if message not in self._skipped_warned:  # each file once per run
                    self._skipped_warned.add(message)
                    rank_zero_warn(f"skipping unreadable image {message}", category=UnreadableImageWarning)
                self._skipped_this_epoch.append(message)

    def on_train_epoch_end(self) -> None:
        # distinct files (a broken file drawn again, or met while replacing another, counts once)
        files = list(dict.fromkeys(self._skipped_this_epoch))
        if files:
            rank_zero_warn(
                f"epoch {self.current_epoch}: {len(files)} unreadable image(s) were skipped and "
                "replaced by the next readable one, e.g. " + "; ".join(files[:5])
            )
        self.log("train/skipped_images", float(len(files)), on_epoch=True)
        self._skipped_this_epoch = []

    # ------------------------------------------------------------------ non-finite policy
    def check_finite(self, terms: dict[str, torch.Tensor], batch_idx: int) -> bool:
        """False when the step must be skipped; raises in ``nonfinite="raise"`` mode.

        ``every_step``: one host sync per step (the bool). ``one_step_late``: the flag of this
        step is read at the next call (or before a checkpoint), the previous one raises here.
        Ranks agree (max over ranks), so under DDP all of them skip or stop together instead of
        hanging in the gradient all-reduce."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        bad = all_reduce_max((~torch.isfinite(values)).float())
        where = (f"global step {self.global_step} (epoch {self.current_epoch}, "
                 f"batch {batch_idx})")
        if self.hparams.nonfinite_check == "one_step_late":
            self._raise_pending_nonfinite()
            self._pending_check = _PendingCheck.start(bad, values, list(terms), where)
            return True
        if not bool(bad.any()):
            self._nonfinite_streak = 0
            return True
        message = _nonfinite_message(list(terms), bad.tolist(), values.tolist(), where)
        if self.hparams.nonfinite == "raise":
            raise FloatingPointError(
                message + _NONFINITE_HINT
                + " To skip such steps instead, set model.init_args.nonfinite: skip"
            )
        self._nonfinite_streak += 1
        if self._nonfinite_streak > self.hparams.max_nonfinite_skips:
            raise FloatingPointError(
                f"{message}: {self._nonfinite_streak} consecutive non-finite steps, more than "
                f"max_nonfinite_skips={self.hparams.max_nonfinite_skips}" + _NONFINITE_HINT
            )
        rank_zero_warn(f"{message}; skipping this optimiser step (nonfinite: skip)")
        for state in self.deferred_updates():
            state.discard()
        return False

    def _raise_pending_nonfinite(self) -> None:
        """Read the flag of the last checked step (``one_step_late``) and raise if it was bad."""
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return
        flags, values = pending.read()
        if any(flags):
            raise FloatingPointError(
                _nonfinite_message(pending.names, flags, values, pending.where)
                + " (read one step late, nonfinite_check: one_step_late; that step's update "
                "was applied, no checkpoint holds it)" + _NONFINITE_HINT
            )

    def on_train_end(self) -> None:
        self._raise_pending_nonfinite()


_NONFINITE_HINT = (
    ". Usual causes: too high a learning rate, fp16 overflow (use precision: bf16-mixed), "
    "or temperatures too low. See the Troubleshooting section of the README."
)


def _nonfinite_message(names: list[str], flags: list[float], values: list[float],
                       where: str) -> str:
    bad = [name for name, b in zip(names, flags) if b]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
    message = f"non-finite loss {', '.join(bad)} at {where}: {shown}"
    if world_size() > 1:
        message += f" (values on rank {rank()}; non-finite on at least one rank)"
    return message


class _PendingCheck:
    """A step's non-finite flags on their way to pinned host memory (no host wait)."""

    def __init__(self, host: torch.Tensor, event: Any, names: list[str], where: str) -> None:
        self.host, self.event, self.names, self.where = host, event, names, where

    @classmethod
    def start(cls, bad: torch.Tensor, values: torch.Tensor, names: list[str],
              where: str) -> _PendingCheck:
        flags = torch.cat([bad, values]).detach()
        if flags.device.type != "cuda":
            return cls(flags.cpu(), None, names, where)
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event, names, where)

    def read(self) -> tuple[list[float], list[float]]:
        if self.event is not None:
            self.event.synchronize()  # waits for the previous step's loss only
        n = len(self.names)
        return self.host[:n].tolist(), self.host[n:].tolist()
