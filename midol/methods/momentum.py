"""A momentum (EMA) teacher on top of :class:`~midol.methods.base.BaseMethod`, in the style of
solo-learn's ``BaseMomentumMethod``: a method lists its (student, teacher) pairs and gets the
EMA update, its schedule and the teacher's train/eval mode."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal, Protocol

from torch import nn

from midol.methods.base import BaseMethod, BaseMethodOptions
from midol.models.ema import ema_update
from midol.optim.schedules import momentum_at

TeacherMode = Literal["eval", "train"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy of ``module`` that takes no gradient."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


class MomentumMethodOptions(BaseMethodOptions, Protocol):
    """``self.hparams`` of :class:`MomentumMethod`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    momentum_start: float
    momentum_end: float
    teacher_mode: TeacherMode


class MomentumMethod(BaseMethod):
    """Student/teacher training with ``T <- m T + (1 - m) S`` (M-IDoL Eq. 22) after every
    optimiser step that trained; ``m`` follows a cosine from ``momentum_start`` to
    ``momentum_end`` over training. The update runs inside :meth:`optimizer_step`, right after
    ``optimizer.step()`` (as dinov2 does), so a checkpoint written at any step already holds that
    step's teacher.

    Args:
        momentum_start: Teacher EMA momentum at the start of training.
        momentum_end: Teacher EMA momentum at the end.
        teacher_mode: ``eval`` (no drop-path or noise in the teacher, midol's default) or
            ``train`` (the teacher runs in training mode, as the M-IDoL authors' code: drop-path
            and gate noise on).
        **kwargs: The arguments of :class:`~midol.methods.base.BaseMethod`.
    """

    if TYPE_CHECKING:

        @property
        def hparams(self) -> MomentumMethodOptions: ...  # type: ignore[override]

    def __init__(
        self,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        teacher_mode: TeacherMode = "eval",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("momentum_start", momentum_start), ("momentum_end", momentum_end)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if teacher_mode not in ("eval", "train"):
            raise ValueError(f"teacher_mode must be 'eval' or 'train', got {teacher_mode!r}")
        self._legacy_ema_pending = False

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs updated by EMA."""
        raise NotImplementedError

    def teachers(self) -> list[nn.Module]:
        return [teacher for _, teacher in self.momentum_pairs()]

    def momentum_at(self, step: int) -> float:
        h = self.hparams
        return momentum_at(step, self._total_steps, h.momentum_start, h.momentum_end)

    def train(self, mode: bool = True) -> MomentumMethod:
        super().train(mode)
        if self.hparams.teacher_mode == "eval":
            for teacher in self.teachers():
                teacher.eval()  # no drop-path in the teacher, also when used outside a Trainer
        return self

    def after_optimizer_step(self, step: int) -> None:
        momentum = self.momentum_at(step)
        for student, teacher in self.momentum_pairs():
            ema_update(teacher, student, momentum)
        self.log_dict(self.device_scalars({"train/momentum": momentum}), on_step=True, on_epoch=False)

    # Checkpoints of midol <= 0.1.0 (commit f90bd5f) were written before the EMA update of their
    # last step and mark it with "midol_last_ema_step": resuming one applies that update once.
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        last = checkpoint.get("midol_last_ema_step")
        self._legacy_ema_pending = last is not None and int(last) < int(checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._legacy_ema_pending and self.global_step > 0:
            for student, teacher in self.momentum_pairs():
                ema_update(teacher, student, self.momentum_at(self.global_step - 1))
        self._legacy_ema_pending = False
