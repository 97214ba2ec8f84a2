"""Watch the routing and the teacher during pre-training: expert load, expert x modality NMI and
purity, teacher-output entropy, and warnings when either collapses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from midol.analysis.metrics import distribution_stats, mean_pairwise_cosine, routing_report
from midol.utils.dist import all_reduce_sum, rank, world_size


class RoutingMonitor(L.Callback):
    """Routing and collapse monitor for :class:`~midol.methods.PretrainModule`.

    Costs no extra forward pass. Two expert x modality matrices are accumulated over each epoch
    of training images, with the batches' ``"modality"`` (reporting only, never a training
    signal): the teacher's Sinkhorn-balanced *training assignment* that ``training_step``
    returns (``"assignment"``, the expert whose subspace L_cst used), and the teacher router's
    per-image *top-1* (arg-max of its logits averaged over the teacher views, no Sinkhorn; what
    ``midol route`` reports). They differ: Sinkhorn spreads every batch over the experts, so the
    training assignment stays balanced even when the router's own top-1 has abandoned experts.
    The router logits and teacher statistics are read from the teacher projector's own forward.

    Logged (to every configured logger):

    * every ``teacher_every_n_steps`` steps: ``teacher/mean_cosine`` (mean cosine similarity of
      the teacher representations of different images, first global view; -> 1 when every
      image gets the same output); with ``cst_loss: dino_ce`` also ``teacher/entropy``,
      ``teacher/batch_entropy`` and ``teacher/info`` of the centred, sharpened teacher output
      ``softmax((t - center) / tau_t)`` (see :func:`~midol.analysis.metrics.distribution_stats`);
      with an MoE ``route/router_entropy`` and ``route/router_info`` of the teacher router's
      ``softmax(g_T / tau_t)`` before Sinkhorn. (``route/expert_i``, the per-step load, is
      logged by the module itself.)
    * at the end of each training epoch: ``route_epoch/{nmi,purity,load_entropy,max_load,
      experts_used,load_i}`` of the training assignment and ``route_top1/*`` of the router
      top-1, over the epoch's training images (all ranks), and their heat-map images (W&B
      ``log_image``, TensorBoard ``add_image``; PNG files in ``image_dir``).
    * every ``heldout_every_n_epochs`` epochs (0 = never): ``route_heldout/*``, the same numbers
      for the per-image top-1 of the teacher router (what ``midol route`` reports) over at most
      ``heldout_per_modality`` centre-cropped corpus images per modality.

    Warnings (``rank_zero_warn``, once per episode):

    * expert collapse: one expert takes more than ``collapse_share`` of a batch's training
      assignment for ``collapse_patience`` consecutive training batches (MoE only);
    * idle experts: at an epoch end, the router top-1 gives fewer than ``min_expert_share`` of
      the epoch's images to some experts (warned again only when more experts fall idle);
    * teacher collapse, checked on the steps where the teacher statistics are computed, for
      ``teacher_patience`` consecutive checks: with ``dino_ce``, ``teacher/info`` below
      ``min_teacher_info`` (the teacher's output no longer depends on the image: DINO's
      constant or uniform collapse); with ``infonce`` (no output distribution),
      ``teacher/mean_cosine`` above ``max_teacher_cosine``.

    Checks read the accumulated per-step values back to the host once every
    ``teacher_every_n_steps`` steps (default: the trainer's ``log_every_n_steps``).
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
        log_images: bool = True,
        image_dir: str | None = None,
    ) -> None:
        if not 0 < collapse_share <= 1:
            raise ValueError(f"collapse_share must lie in (0, 1], got {collapse_share}")
        for name, value in (("collapse_patience", collapse_patience),
                            ("teacher_patience", teacher_patience),
                            ("heldout_per_modality", heldout_per_modality),
                            ("heldout_batch_size", heldout_batch_size)):
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
        self.log_images = log_images
        self.image_dir = image_dir
        # Results, readable after fit: one dict per epoch, and every warning issued.
        self.history: list[dict[str, Any]] = []
        self.top1_history: list[dict[str, Any]] = []
        self.heldout_history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.last_stats: dict[str, torch.Tensor] = {}  # the latest teacher statistics (device)
        self._reset_state()

    def _reset_state(self) -> None:
        self._hook: Any = None
        self._pl_module: Any = None
        self._every = 1
        self._armed = False
        self._capture = False
        self._batch_size = 0
        self._modality: torch.Tensor | None = None
        self._top1_counts: torch.Tensor | None = None
        self._idle_warned = 0  # idle experts at the last idle-expert warning
        self._pending: dict[str, torch.Tensor] = {}
        self._shares: list[torch.Tensor] = []  # per batch: (max share, its expert), on device
        self._teacher_values: list[torch.Tensor] = []
        self._expert_streak = 0
        self._expert_warned = False
        self._teacher_streak = 0
        self._teacher_warned = False
        self._counts: torch.Tensor | None = None
        self._modalities: list[str] = []

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = getattr(pl_module, "teacher", None)
        if teacher is None or "projector" not in teacher or not hasattr(pl_module, "num_experts"):
            raise ValueError(
                "RoutingMonitor needs a PretrainModule-like module (teacher['projector'], "
                "num_experts)"
            )
        self._reset_state()
        self._pl_module = pl_module
        self._every = self.teacher_every_n_steps or max(1, trainer.log_every_n_steps)
        self._hook = teacher["projector"].register_forward_hook(self._on_teacher_output)
        names = getattr(trainer.datamodule, "modalities", None)
        self._modalities = list(names) if names else []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hook()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._armed = True
        self._capture = trainer.global_step % self._every == 0
        self._batch_size = int(batch["views"][0].shape[0])
        self._modality = batch.get("modality") if self._modalities else None

    @torch.no_grad()
    def _on_teacher_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not self._armed:
            return
        self._armed = False  # the first teacher call of the step is the training one
        if output.router_logits is not None and self._modality is not None:
            self._count_top1(output.router_logits)
        if not self._capture:
            return
        pl = self._pl_module
        temp = pl.teacher_temp_at(pl.global_step)
        rep = output.representation
        stats: dict[str, torch.Tensor] = {}
        first_view = rep[: self._batch_size]
        if first_view.shape[0] >= 2:
            stats["teacher/mean_cosine"] = mean_pairwise_cosine(first_view)
        dino = getattr(pl, "dino_loss", None)
        if dino is not None:
            probs = ((rep.float() - dino.center) / temp).softmax(dim=-1)
            stats.update({f"teacher/{k}": v for k, v in distribution_stats(probs).items()})
        if output.router_logits is not None:
            routing = distribution_stats((output.router_logits.float() / temp).softmax(dim=-1))
            stats["route/router_entropy"] = routing["entropy"]
            stats["route/router_info"] = routing["info"]
        self._pending = stats

    def _count_top1(self, router_logits: torch.Tensor) -> None:
        n = router_logits.shape[-1]
        k = len(self._modalities)
        top1 = router_logits.detach().float().view(-1, self._batch_size, n).mean(dim=0).argmax(dim=-1)
        if self._top1_counts is None:
            self._top1_counts = torch.zeros(n * k, dtype=torch.long, device=top1.device)
        flat = top1 * k + self._modality.to(top1.device)
        self._top1_counts.index_add_(0, flat, torch.ones_like(flat))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:  # a skipped step (nonfinite: skip)
            self._pending = {}
            return
        if not isinstance(outputs, dict) or "assignment" not in outputs:
            raise ValueError(
                "RoutingMonitor needs training_step to return a dict with 'assignment' (the "
                "teacher's per-image expert), as PretrainModule does"
            )
        assignment = outputs["assignment"].detach()
        n = int(pl_module.num_experts)
        ones = torch.ones_like(assignment, dtype=torch.float32)
        # index_add_, not bincount: CUDA bincount reads its maximum back to the host.
        load = torch.zeros(n, device=assignment.device).index_add_(0, assignment, ones)
        top, expert = (load / max(1, assignment.numel())).max(dim=0)
        self._shares.append(torch.stack([top, expert.float()]))
        if "modality" in batch and self._modalities:
            k = len(self._modalities)
            if self._counts is None:
                self._counts = torch.zeros(n * k, dtype=torch.long, device=assignment.device)
            flat = assignment * k + batch["modality"].to(assignment.device)
            self._counts.index_add_(0, flat, torch.ones_like(flat))
        if self._pending:
            pl_module.log_dict(self._pending, on_step=True, on_epoch=False)
            self.last_stats = dict(self._pending)
            key = "teacher/info" if "teacher/info" in self._pending else "teacher/mean_cosine"
            if key in self._pending:
                self._teacher_values.append(self._pending[key].float())
            self._pending = {}
            self._check(trainer, n)

    def _check(self, trainer: L.Trainer, num_experts: int) -> None:
        """Host-side collapse checks over the values gathered since the last check (one sync)."""
        shares = torch.stack(self._shares).cpu().tolist() if self._shares else []
        teacher = torch.stack(self._teacher_values).cpu().tolist() if self._teacher_values else []
        self._shares, self._teacher_values = [], []
        if num_experts > 1:
            for share, expert in shares:
                if share > self.collapse_share:
                    self._expert_streak += 1
                    if self._expert_streak >= self.collapse_patience and not self._expert_warned:
                        self._warn(
                            f"expert collapse: expert {int(expert)} took more than "
                            f"{self.collapse_share:.0%} of the batch ({share:.0%} now) for "
                            f"{self._expert_streak} consecutive batches (step {trainer.global_step}). "
                            "The MoE is acting as one expert; counter-measures: "
                            "model.init_args.load_balance_weight, router_noise, more "
                            "sinkhorn_iters, a softer teacher_temp (see docs/analysis.md)."
                        )
                        self._expert_warned = True
                else:
                    self._expert_streak, self._expert_warned = 0, False
        dino = getattr(self._pl_module, "dino_loss", None) is not None
        for value in teacher:
            bad = value < self.min_teacher_info if dino else value > self.max_teacher_cosine
            if bad:
                self._teacher_streak += 1
                if self._teacher_streak >= self.teacher_patience and not self._teacher_warned:
                    what = (f"teacher/info = {value:.4f} < {self.min_teacher_info} (the centred, "
                            "sharpened teacher output no longer depends on the image)" if dino else
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
        if self._counts is not None:
            n, k = int(pl_module.num_experts), len(self._modalities)
            counts = all_reduce_sum(self._counts).view(n, k).cpu()
            self._counts = None
            if counts.sum() > 0:
                report = routing_report(counts, self._modalities)
                self.history.append({"epoch": epoch, "step": trainer.global_step, **report})
                self._log_report(pl_module, "route_epoch", report)
                self._log_heatmap(trainer, counts, f"epoch {epoch}: training assignment", "route_epoch/matrix",
                                  f"routing_epoch{epoch:03d}.png")
        if self._top1_counts is not None:
            n, k = int(pl_module.num_experts), len(self._modalities)
            counts = all_reduce_sum(self._top1_counts).view(n, k).cpu()
            self._top1_counts = None
            if counts.sum() > 0:
                report = routing_report(counts, self._modalities)
                self.top1_history.append({"epoch": epoch, "step": trainer.global_step, **report})
                self._log_report(pl_module, "route_top1", report)
                self._log_heatmap(trainer, counts, f"epoch {epoch}: teacher router top-1 (training images)",
                                  "route_top1/matrix", f"routing_top1_epoch{epoch:03d}.png")
                self._check_idle(report, epoch)
        if self.heldout_every_n_epochs and (epoch + 1) % self.heldout_every_n_epochs == 0:
            self._heldout(trainer, pl_module, epoch)

    def _check_idle(self, report: dict[str, Any], epoch: int) -> None:
        idle = [i for i, share in enumerate(report["expert_load"]) if share < self.min_expert_share]
        if len(idle) > self._idle_warned:
            self._idle_warned = len(idle)
            self._warn(
                f"idle experts: in epoch {epoch} the teacher router's top-1 gave experts {idle} "
                f"less than {self.min_expert_share:.0%} of the images (only "
                f"{report['experts'] - len(idle)} of {report['experts']} in use; loads "
                + ", ".join(f"{x:.2f}" for x in report["expert_load"])
                + "), although Sinkhorn keeps the training assignment balanced. Modalities are "
                "being merged onto fewer experts; see docs/analysis.md for counter-measures."
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
        from midol.routing import routing_counts

        indices = per_modality_indices(corpus, self.heldout_per_modality, seed=0)
        size = getattr(datamodule, "eval_size", None) or datamodule.global_size
        loader = routing_loader(corpus, size, indices[rank()::world_size()], self.heldout_batch_size)
        counts = all_reduce_sum(
            routing_counts(pl_module, loader, len(corpus.modalities), progress=False).to(pl_module.device)
        ).cpu()
        report = routing_report(counts, list(corpus.modalities))
        self.heldout_history.append({"epoch": epoch, "step": trainer.global_step, **report})
        self._log_report(pl_module, "route_heldout", report)
        self._log_heatmap(trainer, counts, f"epoch {epoch}: teacher router top-1", "route_heldout/matrix",
                          f"routing_heldout_epoch{epoch:03d}.png")
        if "nmi" in report:
            rank_zero_info(f"epoch {epoch}: held-out routing NMI {report['nmi']:.3f}, "
                           f"purity {report['purity']:.3f} over {report['images']} images")
