"""Watch routing and the teacher during pre-training: expert load, expert x modality NMI and
purity per router, teacher statistics, and warnings when either collapses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from midol.methods.interfaces import ExpertChoice, Monitored, Routed
from midol.utils.cluster_metrics import routing_report
from midol.utils.dist import all_reduce_sum, rank, world_size


def heatmap_file(prefix: str, epoch: int) -> str:
    """``route_epoch`` -> ``routing_epoch003.png``, ``route_top1`` -> ``routing_top1_epoch003.png``."""
    suffix = prefix.removeprefix("route_")
    stem = "routing" if suffix == "epoch" else f"routing_{suffix}"
    return f"{stem}_epoch{epoch:03d}.png"


DEFAULT_HINT = ("model.init_args.load_balance_weight, router_noise, more sinkhorn_iters, a softer "
                "teacher_temp (see docs/analysis.md).")


FLAT_MIN_EPOCHS = 3  # a loss term observed at this many epoch ends or more ...
FLAT_RELATIVE_RANGE = 1e-3  # ... whose values span at most this fraction of their mean is flat


class RoutingMonitor(L.Callback):
    """Routing and collapse monitor for any method whose ``training_step`` returns a
    :class:`~midol.methods.interfaces.StepOutput`.

    Costs no extra forward pass. For every router assignment a step reports (``routing``, keyed
    by log prefix) an expert x modality matrix is accumulated over each epoch of training
    images, with the batches' ``"modality"`` (reporting only, never a training signal). M-IDoL
    reports two: ``route_epoch``, the teacher's Sinkhorn-balanced *training assignment* (the
    expert whose subspace L_cst used), and ``route_top1``, the teacher router's per-image top-1
    (arg-max of its logits averaged over the teacher views, no Sinkhorn; what ``midol route``
    reports). They differ: Sinkhorn spreads every batch over the experts, so the training
    assignment stays balanced even when the router's own top-1 has abandoned experts.

    Logged (to every configured logger):

    * every ``teacher_every_n_steps`` steps: the method's ``health`` values (M-IDoL:
      ``teacher/mean_cosine``, with ``cst_loss: dino_ce`` also ``teacher/entropy``,
      ``teacher/batch_entropy`` and ``teacher/info``, and ``route/router_entropy``,
      ``route/router_info``).
    * at the end of each training epoch, per routing key: ``<key>/{nmi,purity,load_entropy,
      max_load,experts_used,load_i}`` over the epoch's training images (all ranks), and their
      heat-map images (W&B ``log_image``, TensorBoard ``add_image``; PNG files in ``image_dir``).
    * every ``heldout_every_n_epochs`` epochs (0 = never): ``route_heldout/*``, the same numbers
      for the method's per-image routing (``route()``) over at most ``heldout_per_modality``
      centre-cropped corpus images per modality (``route_heldout_<router>/*`` with several
      routers).

    Warnings (``rank_zero_warn``):

    * expert collapse: one expert takes more than ``collapse_share`` of a batch for
      ``collapse_patience`` consecutive training batches (assignments with ``collapse_check``);
    * idle experts: at an epoch end some experts received fewer than ``min_expert_share`` of the
      epoch's images (assignments with ``idle_check``); repeated whenever an expert falls idle
      that the last warning did not name, and every ``idle_repeat_epochs`` epochs while any
      stays idle, so silence means recovery;
    * teacher collapse, for ``teacher_patience`` consecutive checks: ``teacher/info`` below
      ``min_teacher_info`` when the method reports it (the teacher's output no longer depends on
      the image: DINO's constant or uniform collapse), else ``teacher/mean_cosine`` above
      ``max_teacher_cosine``.

    Checks read the accumulated per-step values back to the host once every
    ``teacher_every_n_steps`` steps (default: the trainer's ``log_every_n_steps``).

    Args:
        collapse_share: Share of a batch above which one expert counts as collapsed.
        collapse_patience: Consecutive collapsed batches before the warning.
        teacher_every_n_steps: Steps between health statistics and checks (default: the
            trainer's ``log_every_n_steps``).
        min_teacher_info: Lowest ``teacher/info`` before a teacher-collapse warning.
        max_teacher_cosine: Highest ``teacher/mean_cosine`` before a teacher-collapse warning.
        teacher_patience: Consecutive bad checks before the warning.
        heldout_every_n_epochs: Epochs between held-out routing passes (0 = never).
        heldout_per_modality: Images per modality of the held-out pass.
        heldout_batch_size: Batch size of the held-out pass.
        min_expert_share: Share of the epoch's images below which an expert is idle.
        idle_repeat_epochs: Repeat the idle-expert warning this often while it holds.
        log_images: Log heat-maps to the loggers that take images.
        image_dir: Also write the heat-maps as PNG files here.
    """

    def __init__(
        self,
        collapse_share: float = 0.9,
        collapse_patience: int = 50,
        teacher_every_n_steps: int | None = None,
        min_teacher_info: float = 0.02,
        max_teacher_cosine: float = 0.99,
        teacher_patience: int = 10,
        heldout_every_n_epochs: int = 0,
        heldout_per_modality: int = 200,
        heldout_batch_size: int = 64,
        min_expert_share: float = 0.01,
        idle_repeat_epochs: int = 5,
        log_images: bool = True,
        image_dir: str | None = None,
    ) -> None:
        if not 0 < collapse_share <= 1:
            raise ValueError(f"collapse_share must lie in (0, 1], got {collapse_share}")
        for name, value in (("collapse_patience", collapse_patience),
                            ("teacher_patience", teacher_patience),
                            ("heldout_per_modality", heldout_per_modality),
                            ("heldout_batch_size", heldout_batch_size),
                            ("idle_repeat_epochs", idle_repeat_epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if teacher_every_n_steps is not None and teacher_every_n_steps < 1:
            raise ValueError(f"teacher_every_n_steps must be >= 1, got {teacher_every_n_steps}")
        if heldout_every_n_epochs < 0:
            raise ValueError(f"heldout_every_n_epochs must be >= 0, got {heldout_every_n_epochs}")
        if not 0 <= min_expert_share < 1:
            raise ValueError(f"min_expert_share must lie in [0, 1), got {min_expert_share}")
        if not 0 <= min_teacher_info <= 1 or not -1 <= max_teacher_cosine <= 1:
            raise ValueError("min_teacher_info must lie in [0, 1] and max_teacher_cosine in [-1, 1]")
        self.collapse_share = collapse_share
        self.collapse_patience = collapse_patience
        self.teacher_every_n_steps = teacher_every_n_steps
        self.min_teacher_info = min_teacher_info
        self.max_teacher_cosine = max_teacher_cosine
        self.teacher_patience = teacher_patience
        self.heldout_every_n_epochs = heldout_every_n_epochs
        self.heldout_per_modality = heldout_per_modality
        self.heldout_batch_size = heldout_batch_size
        self.min_expert_share = min_expert_share
        self.idle_repeat_epochs = idle_repeat_epochs
        self.log_images = log_images
        self.image_dir = image_dir
        # Results, readable after fit: per routing key one dict per epoch, and every warning.
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.heldout_history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.last_stats: dict[str, torch.Tensor] = {}  # the latest health statistics (device)
        self._reset_state()

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch reports of M-IDoL's training assignment (``route_epoch``)."""
        return self.histories.get("route_epoch", [])

    @property
    def top1_history(self) -> list[dict[str, Any]]:
        """Per-epoch reports of M-IDoL's teacher-router top-1 (``route_top1``)."""
        return self.histories.get("route_top1", [])

    def _reset_state(self) -> None:
        self._every = 1
        self._since_check = 0
        self._modalities: list[str] = []
        self._choices: dict[str, ExpertChoice] = {}  # the last step's, for sizes and labels
        self._counts: dict[str, torch.Tensor] = {}
        self._shares: dict[str, list[torch.Tensor]] = {}  # per batch: (max share, its expert)
        self._streaks: dict[str, int] = {}
        self._collapse_warned: dict[str, bool] = {}
        # per key: experts named by the last warning, its epoch, first epoch of the idle spell
        self._idle: dict[str, tuple[frozenset[int], int, int]] = {}
        self._teacher_values: list[torch.Tensor] = []
        self._teacher_key: str | None = None
        self._terms: dict[str, list[float]] = {}  # per summary loss: its value at each epoch end
        self._teacher_streak = 0
        self._teacher_warned = False

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, Routed):
            raise ValueError(
                f"RoutingMonitor needs a method with routers() (midol.methods.interfaces.Routed); "
                f"{type(pl_module).__name__} has none: remove the callback from the config"
            )
        self._reset_state()
        self._every = self.teacher_every_n_steps or max(1, trainer.log_every_n_steps)
        if isinstance(pl_module, Monitored):
            pl_module.request_health(self._every)
        names = getattr(trainer.datamodule, "modalities", None)
        self._modalities = list(names) if names else []

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict):  # None: a skipped step (nonfinite: skip)
            return
        modality = batch.get("modality") if isinstance(batch, dict) and self._modalities else None
        for key, choice in (outputs.get("routing") or {}).items():
            self._accumulate(key, choice, modality)
        health = outputs.get("health") or {}
        if health:
            pl_module.log_dict(health, on_step=True, on_epoch=False)
            self.last_stats = dict(health)
            key = "teacher/info" if "teacher/info" in health else "teacher/mean_cosine"
            if key in health:
                self._teacher_key = key
                self._teacher_values.append(health[key].float())
        self._since_check += 1
        if health or self._since_check >= self._every:
            self._since_check = 0
            self._check(trainer)

    def _accumulate(self, key: str, choice: ExpertChoice, modality: torch.Tensor | None) -> None:
        assignment = choice.expert.detach()
        n = int(choice.num_experts)
        self._choices[key] = choice
        if choice.collapse_check:
            ones = torch.ones_like(assignment, dtype=torch.float32)
            # index_add_, not bincount: CUDA bincount reads its maximum back to the host.
            load = torch.zeros(n, device=assignment.device).index_add_(0, assignment, ones)
            top, expert = (load / max(1, assignment.numel())).max(dim=0)
            self._shares.setdefault(key, []).append(torch.stack([top, expert.float()]))
        if modality is not None:
            k = len(self._modalities)
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = torch.zeros(n * k, dtype=torch.long, device=assignment.device)
            flat = assignment * k + modality.to(assignment.device)
            counts.index_add_(0, flat, torch.ones_like(flat))

    def _check(self, trainer: L.Trainer) -> None:
        """Host-side collapse checks over the values gathered since the last check (one sync)."""
        for key, shares in self._shares.items():
            values = torch.stack(shares).cpu().tolist() if shares else []
            self._shares[key] = []
            if self._choices[key].num_experts <= 1:
                continue
            for share, expert in values:
                if share > self.collapse_share:
                    self._streaks[key] = self._streaks.get(key, 0) + 1
                    if self._streaks[key] >= self.collapse_patience and not self._collapse_warned.get(key):
                        where = f" ({key})" if len(self._shares) > 1 else ""
                        self._warn(
                            f"expert collapse{where}: expert {int(expert)} took more than "
                            f"{self.collapse_share:.0%} of the batch ({share:.0%} now) for "
                            f"{self._streaks[key]} consecutive batches (step {trainer.global_step}). "
                            "The MoE is acting as one expert; counter-measures: "
                            + getattr(getattr(trainer, "lightning_module", None), "collapse_hint",
                                      lambda: DEFAULT_HINT)()
                        )
                        self._collapse_warned[key] = True
                else:
                    self._streaks[key], self._collapse_warned[key] = 0, False
        teacher = torch.stack(self._teacher_values).cpu().tolist() if self._teacher_values else []
        self._teacher_values = []
        info = self._teacher_key == "teacher/info"
        for value in teacher:
            bad = value < self.min_teacher_info if info else value > self.max_teacher_cosine
            if bad:
                self._teacher_streak += 1
                if self._teacher_streak >= self.teacher_patience and not self._teacher_warned:
                    what = (f"teacher/info = {value:.4f} < {self.min_teacher_info} (the centred, "
                            "sharpened teacher output no longer depends on the image)" if info else
                            f"teacher/mean_cosine = {value:.4f} > {self.max_teacher_cosine} (every "
                            "image gets nearly the same teacher representation)")
                    self._warn(
                        f"teacher collapse: {what} for {self._teacher_streak} consecutive checks "
                        f"(step {trainer.global_step}). Check the learning rate, teacher_temp "
                        "(and its warm-up), center_momentum and the EMA momentum."
                    )
                    self._teacher_warned = True
            else:
                self._teacher_streak, self._teacher_warned = 0, False

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        rank_zero_warn(f"RoutingMonitor: {message}")

    # ------------------------------------------------------------------ per epoch
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        for key in getattr(pl_module, "summary_metrics", lambda: [])():
            value = trainer.callback_metrics.get(key)
            if value is not None and value.numel() == 1 and bool(torch.isfinite(value)):
                self._terms.setdefault(key, []).append(float(value))
        k = len(self._modalities)
        for key, flat in self._counts.items():
            choice = self._choices[key]
            counts = all_reduce_sum(flat).view(choice.num_experts, k).cpu()
            if counts.sum() == 0:
                continue
            report = routing_report(counts, self._modalities)
            self.histories.setdefault(key, []).append({"epoch": epoch, "step": trainer.global_step, **report})
            self._log_report(pl_module, key, report)
            label = choice.label or key
            self._log_heatmap(trainer, counts, f"epoch {epoch}: {label}", f"{key}/matrix",
                              heatmap_file(key, epoch))
            if choice.idle_check:
                self._check_idle(key, label, report, epoch)
        self._counts = {}
        if self.heldout_every_n_epochs and (epoch + 1) % self.heldout_every_n_epochs == 0:
            self._heldout(trainer, pl_module, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn about a loss term that stayed flat for the whole run (issue 26: DEX's L_co
        stayed within 0.1% for 400 steps): it trains nothing, whatever its weight."""
        for key, values in self._terms.items():
            if len(values) < FLAT_MIN_EPOCHS:
                continue
            centre = sum(values) / len(values)
            spread = max(values) - min(values)
            if spread <= FLAT_RELATIVE_RANGE * max(abs(centre), 1e-12):
                hint = getattr(pl_module, "flat_term_hint", lambda k: "")(key)
                rank_zero_warn(
                    f"{key} stayed within {spread:.3g} of {centre:.4g} ({100 * spread / max(abs(centre), 1e-12):.2f}%) "
                    f"over {len(values)} epochs: this term does not change and trains nothing"
                    + (f"; {hint}" if hint else "; check its weight and whether its gradient reaches "
                       "the parameters it should move"))

    def _check_idle(self, key: str, label: str, report: dict[str, Any], epoch: int) -> None:
        idle = [i for i, share in enumerate(report["expert_load"]) if share < self.min_expert_share]
        if not idle:  # recovered: the next idle epoch warns at once
            self._idle.pop(key, None)
            return
        warned, last_epoch, since = self._idle.get(key, (frozenset(), -10**9, epoch))
        new = not set(idle) <= warned
        if not (new or epoch - last_epoch >= self.idle_repeat_epochs):
            # a shrinking set is partial recovery: an expert that comes back idle warns again
            self._idle[key] = (warned & frozenset(idle), last_epoch, since)
            return
        self._idle[key] = (frozenset(idle), epoch, since)
        spell = f"; idle since epoch {since}" if since < epoch else ""
        self._warn(
            f"idle experts: in epoch {epoch} the {label} gave experts {idle} "
            f"less than {self.min_expert_share:.0%} of the images (only "
            f"{report['experts'] - len(idle)} of {report['experts']} in use; loads "
            + ", ".join(f"{x:.2f}" for x in report["expert_load"])
            + f"{spell}). Modalities are being merged onto fewer experts; see docs/analysis.md "
            f"for counter-measures. Repeated every {self.idle_repeat_epochs} epoch(s) while "
            "experts stay idle and whenever another falls idle; silence means recovery."
        )

    def _log_report(self, pl_module: L.LightningModule, prefix: str, report: dict[str, Any]) -> None:
        values = {f"{prefix}/{key}": float(report[key])
                  for key in ("nmi", "purity", "load_entropy", "max_load", "experts_used")
                  if key in report}
        values.update({f"{prefix}/load_{i}": float(x) for i, x in enumerate(report["expert_load"])})
        pl_module.log_dict(values, on_step=False, on_epoch=True)

    def _log_heatmap(self, trainer: L.Trainer, counts: torch.Tensor, title: str, key: str,
                     file_name: str) -> None:
        if not trainer.is_global_zero or not (self.log_images or self.image_dir):
            return
        from midol.analysis.heatmap import routing_heatmap  # matplotlib only when drawing
        from midol.analysis.plotting import figure_to_array, save_figure

        fig = routing_heatmap(counts.numpy(), self._modalities, title=title)
        if self.image_dir:
            save_figure(fig, Path(self.image_dir) / file_name)
        if not self.log_images:
            return
        image = None
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)  # W&B
            experiment_add = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(log_image) or callable(experiment_add):
                image = figure_to_array(fig) if image is None else image
            if callable(log_image):
                log_image(key=key, images=[image], step=trainer.global_step, caption=[title])
            elif callable(experiment_add):  # TensorBoard
                experiment_add(key, image, trainer.global_step, dataformats="HWC")

    def _heldout(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        datamodule = trainer.datamodule
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None or not self._modalities:
            raise ValueError("heldout_every_n_epochs needs a PretrainDataModule (corpus, modalities)")
        from midol.analysis.features import per_modality_indices, routing_loader
        from midol.analysis.routing_table import routing_counts

        indices = per_modality_indices(corpus, self.heldout_per_modality, seed=0)
        size = getattr(datamodule, "eval_size", None) or datamodule.global_size
        loader = routing_loader(corpus, size, indices[rank()::world_size()], self.heldout_batch_size)
        tables = routing_counts(pl_module, loader, len(corpus.modalities), progress=False)  # type: ignore[arg-type]
        for name, table in tables.items():
            counts = all_reduce_sum(table.to(pl_module.device)).cpu()
            prefix = "route_heldout" if len(tables) == 1 else f"route_heldout_{name}"
            report = routing_report(counts, list(corpus.modalities))
            self.heldout_history.append({"epoch": epoch, "step": trainer.global_step,
                                         "router": name, **report})
            self._log_report(pl_module, prefix, report)
            self._log_heatmap(trainer, counts, f"epoch {epoch}: router {name} top-1",
                              f"{prefix}/matrix", heatmap_file(prefix, epoch))
            if "nmi" in report:
                rank_zero_info(f"epoch {epoch}: held-out routing NMI ({name}) {report['nmi']:.3f}, "
                               f"purity {report['purity']:.3f} over {report['images']} images")
