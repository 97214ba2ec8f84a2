"""A callback for the ablation runs: how far the EMA teacher moved from its initialisation.

Writes ``{"relative_change": ||theta_T(end) - theta_T(0)|| / ||theta_T(0)||, ...}`` to
``<default_root_dir>/teacher_drift.json`` at the end of training, so a row whose teacher
stayed at its initialisation (momentum too close to 1 for the step count) is visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class TeacherDrift(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = {k: v.detach().clone().float() for k, v in pl_module.teacher.state_dict().items()
                       if v.is_floating_point()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = {k: v.detach().float() for k, v in pl_module.teacher.state_dict().items() if k in self._start}
        diff = torch.sqrt(sum(((end[k] - self._start[k]) ** 2).sum() for k in end))
        norm = torch.sqrt(sum((v**2).sum() for v in self._start.values()))
        backbone = [k for k in end if k.startswith("backbone.")]
        b_diff = torch.sqrt(sum(((end[k] - self._start[k]) ** 2).sum() for k in backbone))
        b_norm = torch.sqrt(sum((self._start[k] ** 2).sum() for k in backbone))
        out = {"relative_change": float(diff / norm), "backbone_relative_change": float(b_diff / b_norm),
               "steps": int(trainer.global_step)}
        Path(trainer.default_root_dir, "teacher_drift.json").write_text(json.dumps(out) + "\n")
