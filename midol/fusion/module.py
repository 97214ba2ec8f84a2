"""MedMIX: fusion of several frozen expert backbones across whichever inputs a patient has.

MedMIX (Cho, Qiu, Li 2026, "MedMIX: Modality-Internal Expert Fusion for Multimodal Medical
Diagnosis", arXiv 2605.16639) establishes three parts: intra-modality fusion of several small
expert embeddings, learned sample-specific fusion over the modalities that are present, and a
large teacher used only in training. Its code is not public: everything below is midol's
reconstruction from the abstract (``docs/papers/medmix.md``, "midol's design").

The training loss (midol's design)::

    L = L_task + aux_weight * mean_m L_task(aux_m, present m)
        + distill_weight * mean_{b,m present, teacher} (1 - cos(P_m z_m, t_m))
        [+ kd_weight * T^2 KL(teacher logits || logits)]

Frozen experts and teachers are run once per image and cached on disk
(:class:`~midol.data.feature_cache.FeatureCache`); batches then carry patient rows, not pixels.
With ``finetune_experts: true`` the experts train and see pixels every step (no cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from midol.data.feature_cache import CacheKey
from midol.data.missingness import (
    balanced_drop,
    balancing_drop_rates,
    positive_patients,
    random_drop,
)
from midol.fusion.experts import (
    ExpertSpec,
    build_expert,
    build_from_recipe,
    expert_features,
    parse_expert_table,
)
from midol.fusion.losses import aux_task_loss, teacher_distill_loss
from midol.fusion.options import MedMIXOptions, validate_options
from midol.fusion.patient_features import FeatureSettings, PatientFeatures, patient_batch
from midol.fusion.structure import check_same_structure, structure_from
from midol.losses.distill import logit_kl_loss
from midol.methods.base import BaseMethod
from midol.methods.interfaces import BackboneExport
from midol.models.fusion import FusionMode, PoolMode
from midol.models.medmix_net import MedMIXNet, NetOutput
from midol.tasks.base import report_best_checkpoint
from midol.tasks.stage_metrics import StageMetrics
from midol.tasks.task_metrics import classification_metrics, multilabel_metrics


class MedMIX(BaseMethod):
    """MedMIX fusion model on a :class:`~midol.data.patient_datamodule.PatientDataModule`.

    Args:
        experts: per image modality (an input's ``modality``, e.g. ``fundus`` for both eyes),
            the list of frozen expert backbones (:class:`~midol.fusion.experts.
            ExpertSpec` fields: ``name``, ``backbone``, ``backbone_kwargs``, ``checkpoint``,
            ``image_size``, ``seed``, ...).
        teachers: per image modality, one larger training-only backbone (same fields) whose
            embeddings are distilled into each of that modality's fused inputs; null: no teacher.
        dim: common width of every input embedding.
        pooling: intra-input fusion of the experts: ``attention`` (MedMIX), ``mean`` or
            ``concat`` (concatenate, then project).
        expert_dropout: training-only probability of dropping each expert of a sample.
        fusion: inter-input fusion: ``reliability`` (masked softmax over present inputs,
            MedMIX), ``mean`` (of present inputs), ``concat_missing`` (learned embeddings for
            absent inputs) or ``transformer`` (a small transformer over input tokens).
        aux_heads: one auxiliary task head per input, trained on the samples that have it.
        aux_weight: weight of the auxiliary losses (mean over inputs).
        aux_entropy_scores: add the negative entropy of each input's auxiliary prediction to its
            reliability score (needs ``aux_heads`` and ``fusion: reliability``).
        hidden_dim: width of the tabular MLP and the reliability scorer.
        head_dropout: dropout before the task head.
        distill_weight: ``lambda_f`` of the feature distillation ``1 - cos(P_m z_m, t_m)``.
        teacher_logits: optional CSV of a teacher classifier's logits (the manifest's id column
            plus one column per label or class, named like them) for the logit KL term.
        kd_weight: weight of that KL term.
        kd_temperature: its temperature T (the term is scaled by T^2).
        train_drop_rate: train-time multi-random drop: each present input of a training sample
            is dropped with this probability (at least one kept).
        train_drop_input: train-time one-input drop: this input is never seen in training
            (training samples that have nothing else are left out of the loss).
        missingness_balance: train-time counter-measure to labels that predict missingness:
            each image input is dropped, in training, for the patients of the stratum (positive
            or negative, see ``negative_labels``) where it is missing less often, so that it is
            missing equally often in both and absence carries no label information
            (``midol robustness`` flags models that read the label from missingness).
        negative_labels: labels (multi-label) or classes (multi-class) that do not make a
            patient positive, for ``missingness_balance`` (ODIR: ``[N]``, normal).
        finetune_experts: train the experts too (pixels every step, no feature cache).
        cache_dir: folder of the on-disk feature cache.
        cache_key: how cached rows are matched to files: ``stat`` (path, size, modification
            time: free; an image rewritten in place with the same size and time is not seen)
            or ``content`` (a hash of the bytes: every file read once per run; no edit unseen).
        feature_batch_size: images per forward pass when computing features for the cache.
        feature_workers: data-loader workers when computing features for the cache.
        structure: filled from the data when the model is set up and saved with checkpoints
            (inputs, expert recipes, labels); leave it unset.
        input_specs: filled at fit like ``structure``: the manifest's input columns and id
            column, so that the deployable model scores a CSV of new patients; leave it unset.
        base_lr, lr_batch_size, min_lr, warmup_epochs, weight_decay, weight_decay_end, betas,
            ``**kwargs``: the shared schedule and optimiser settings of
            :class:`~midol.methods.base.BaseMethod`.
    """

    if TYPE_CHECKING:

        @property
        def hparams(self) -> MedMIXOptions: ...  # type: ignore[override]

    def __init__(
        self,
        experts: dict[str, list[dict[str, Any]]],
        teachers: dict[str, dict[str, Any]] | None = None,
        dim: int = 128,
        pooling: PoolMode = "attention",
        expert_dropout: float = 0.0,
        fusion: FusionMode = "reliability",
        aux_heads: bool = False,
        aux_weight: float = 0.3,
        aux_entropy_scores: bool = False,
        hidden_dim: int = 64,
        head_dropout: float = 0.1,
        distill_weight: float = 1.0,
        teacher_logits: str | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 2.0,
        train_drop_rate: float = 0.0,
        train_drop_input: str | None = None,
        missingness_balance: bool = False,
        negative_labels: list[str] | None = None,
        finetune_experts: bool = False,
        cache_dir: str = "outputs/feature_cache",
        cache_key: CacheKey = "stat",
        feature_batch_size: int = 64,
        feature_workers: int = 0,
        structure: dict[str, Any] | None = None,
        input_specs: dict[str, Any] | None = None,
        base_lr: float = 1e-3,
        lr_batch_size: int = 64,
        min_lr: float = 1e-6,
        warmup_epochs: float = 1.0,
        weight_decay: float = 1e-4,
        weight_decay_end: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        **kwargs: Any,
    ) -> None:
        super().__init__(base_lr=base_lr, lr_batch_size=lr_batch_size, min_lr=min_lr,
                         warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                         weight_decay_end=weight_decay_end, betas=betas, **kwargs)
        self._validate_medmix()
        self.expert_specs = parse_expert_table(experts, "experts", check_files=structure is None)
        if not self.expert_specs:
            raise ValueError("experts: name at least one expert backbone for an image modality")
        teacher_table = parse_expert_table({m: [t] for m, t in (teachers or {}).items()}, "teachers",
                                           check_files=structure is None)
        self.teacher_specs: dict[str, ExpertSpec] = {m: t[0] for m, t in teacher_table.items()}
        unknown = sorted(set(self.teacher_specs) - set(self.expert_specs))
        if unknown:
            raise ValueError(f"teachers for modalities {unknown} that have no experts "
                             f"(experts: {sorted(self.expert_specs)})")
        self.experts = nn.ModuleDict()  # modality -> ModuleList of frozen backbones
        self.expert_recipes: dict[str, list[dict[str, Any]]] = {}
        self.net: MedMIXNet | None = None
        self.projections = nn.ModuleDict()  # input -> P_m (training only, not exported)
        # Training-only teachers sit outside the module tree: not in the state dict, not moved
        # to the device, absent from the deployable model (built on a cache miss only).
        self.features = PatientFeatures()
        self._balance_rates: torch.Tensor | None = None  # N x M (missingness_balance)  # cached expert/teacher features per patient row
        self.table: Any = None
        if structure is not None:
            self._build(structure, from_recipes=True)

    def _validate_medmix(self) -> None:
        validate_options(self.hparams)

    # ------------------------------------------------------------------ building
    def _build(self, structure: dict[str, Any], from_recipes: bool) -> None:
        """Experts (from the files, or from recorded recipes when rebuilding a checkpoint), the
        network and the distillation projections."""
        h = self.hparams
        for modality, recipes in structure["experts"].items():
            if from_recipes:
                self.experts[modality] = nn.ModuleList(build_from_recipe(r) for r in recipes)
                self.expert_recipes[modality] = [dict(r) for r in recipes]
        structure = dict(structure)
        structure["expert_dims"] = {m: [int(r["dim"]) for r in rs] for m, rs in structure["experts"].items()}
        self.net = MedMIXNet(structure, h.dim, h.pooling, h.expert_dropout, h.fusion, h.aux_heads,
                             h.aux_entropy_scores, h.hidden_dim, h.head_dropout)
        for name, dim in structure.get("teacher_dims", {}).items():
            self.projections[name] = nn.Linear(h.dim, int(dim))
        self.structure = structure
        self.input_names = [s["name"] for s in structure["inputs"]]

    def load_experts(self, modalities: set[str] | None = None) -> None:
        """Build the experts of ``modalities`` (default: all) from their specs (reads the weight
        files). Experts of a modality no input uses are never built: they would sit in the
        state dict without being recorded for the rebuild (issue 26: a demographics-only model
        could not be reloaded)."""
        for modality, specs in self.expert_specs.items():
            if modalities is not None and modality not in modalities:
                continue
            built = [build_expert(s) for s in specs]
            self.experts[modality] = nn.ModuleList(m for m, _ in built)
            self.expert_recipes[modality] = [r for _, r in built]
        if self.hparams.finetune_experts:
            self.experts.requires_grad_(True)

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "table"):
            raise ValueError("MedMIX needs a patient datamodule (midol.data.PatientDataModule)")
        self.attach(datamodule, fit=stage == "fit")

    def attach(self, datamodule: Any, fit: bool = False) -> None:
        """Read the datamodule's patient table: build the network (first time), fit the
        tabular statistics on the training split (``fit``), and load or compute the cached
        expert and teacher features of every patient."""
        if fit:  # before the first feature pass, not after it (issue 26 item 7)
            self.feature_settings().cache().check_writable("model.init_args.cache_dir")
        if getattr(datamodule, "table", None) is None:
            datamodule.setup("fit")
        table = datamodule.table
        used = {spec.modality or spec.name for spec in table.inputs if spec.kind == "image"}
        if not all(m in self.experts for m in used & set(self.expert_specs)):  # else rebuilt
            self.load_experts(used)
        structure = structure_from(table, self.expert_specs, self.teacher_specs, self.expert_recipes)
        settings = self.feature_settings()
        if self.net is None:
            self.features.compute_teachers(table, settings, self.teacher_specs, structure["teacher_dims"])
            self._build(structure, from_recipes=False)
            self.hparams["structure"] = {k: v for k, v in self.structure.items() if k != "expert_dims"}
        else:
            check_same_structure(self.structure, structure)
            self.features.compute_teachers(table, settings, self.teacher_specs,
                                           self.structure["teacher_dims"])
        self.table = table
        if self.hparams.train_drop_input and self.hparams.train_drop_input not in self.input_names:
            raise ValueError(f"train_drop_input: {self.hparams.train_drop_input!r} is not an input "
                             f"of the data (inputs: {', '.join(self.input_names)})")
        if fit:
            self._fit_tabular(table)
        self.features.compute_experts(table, settings, self.expert_specs, dict(self.experts.items()),
                                      self.expert_recipes, keep=not self.hparams.finetune_experts)
        if fit and self.hparams.missingness_balance:
            self._fit_missingness_balance(table)
        if fit:
            self.hparams["input_specs"] = {
                "inputs": [dataclasses.asdict(spec) for spec in table.inputs],
                "id_column": getattr(datamodule, "id_column", "patient_id")}
        if not self.hparams.finetune_experts:
            datamodule.set_load_images(False)
        if self.hparams.teacher_logits:
            self.features.read_teacher_logits(self.hparams.teacher_logits, table)
        self.to(self.device)

    def _fit_missingness_balance(self, table: Any) -> None:
        """Per training row, the drop probability of each input that balances its absence
        across positive and negative patients (:func:`balancing_drop_rates`)."""
        negatives = list(self.hparams.negative_labels or ["N"])
        unknown = sorted(set(negatives) - set(table.label_names))
        if unknown:
            raise ValueError(f"negative_labels: {unknown} are not labels of the data "
                             f"(labels: {', '.join(table.label_names)})")
        available = self.features.presence(torch.as_tensor(table.present),
                                            torch.arange(len(table.patient_ids))).cpu()
        positive = torch.as_tensor(positive_patients(table.targets, table.label_names, negatives))
        train = torch.as_tensor(table.rows("train"), dtype=torch.long)
        is_image = torch.tensor([spec.kind == "image" for spec in table.inputs])
        rates = balancing_drop_rates(available[train], positive[train]) * is_image  # 2 x M
        self._balance_rates = rates[positive.long()]  # N x M, by row (kept off the state dict)
        rank_zero_info("missingness_balance: training drop rates (negative / positive patients) "
                       + ", ".join(f"{n} {rates[0, m]:.2f}/{rates[1, m]:.2f}"
                                   for m, n in enumerate(table.input_names) if is_image[m]))

    def _fit_tabular(self, table: Any) -> None:
        assert self.net is not None
        train = torch.as_tensor(table.rows("train"), dtype=torch.long)
        for name, encoder in self.net.tabular.items():
            arrays = table.tabular(name)
            numeric = torch.as_tensor(arrays.numeric)[train]
            present = torch.as_tensor(arrays.numeric_present)[train]
            if encoder.num_numeric:
                encoder.fit(numeric.to(encoder.mean), present.to(encoder.mean.device))

    def feature_settings(self) -> FeatureSettings:
        h = self.hparams
        return FeatureSettings(h.cache_dir, h.feature_batch_size, h.feature_workers, self.device,
                               h.cache_key)

    # ------------------------------------------------------------------ forward
    def batch_size_of(self, batch: Any) -> int:
        return int(batch["index"].shape[0])

    def trainable_modules(self) -> list[nn.Module]:
        if self.net is None:
            raise RuntimeError("MedMIX: the network is built in setup() from the data")
        modules: list[nn.Module] = [self.net, self.projections]
        if self.hparams.finetune_experts:
            modules.append(self.experts)
        return modules

    def train(self, mode: bool = True) -> MedMIX:
        super().train(mode)
        if not self.hparams.finetune_experts:
            self.experts.eval()  # frozen: no dropout, no norm statistics
        return self

    def batch_inputs(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """Network inputs and the presence mask of a batch (cached features looked up by row)."""
        if self.net is None:
            raise RuntimeError("MedMIX: call setup()/attach(datamodule) before using the model")
        index = batch["index"].long()
        present = self.features.presence(batch["present"], index)
        inputs: dict[str, Any] = {}
        for spec in self.structure["inputs"]:
            name = spec["name"]
            if spec["kind"] == "image":
                if self.hparams.finetune_experts:
                    inputs[name] = self.expert_features(spec["modality"], batch["image"][name])
                else:
                    inputs[name] = self.features.expert_rows(name, index, self.device)
            elif spec["kind"] == "tabular":
                inputs[name] = batch["tabular"][name]
            else:
                inputs[name] = batch["embedding"][name]
        return inputs, present

    def expert_features(self, modality: str, images: torch.Tensor) -> list[torch.Tensor]:
        """Features of uint8 images through each expert of ``modality`` (resized to its size)."""
        return expert_features(self.normalize(images), self.experts[modality],
                               self.expert_recipes[modality])

    def task_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.structure["task"] == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target.long())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        h = self.hparams
        assert self.net is not None
        inputs, present = self.batch_inputs(batch)
        target = batch["target"]
        keep = torch.ones(present.shape[0], dtype=torch.bool, device=present.device)
        if h.train_drop_input:
            j = self.input_names.index(h.train_drop_input)
            present = present.clone()
            present[:, j] = False
            keep = present.any(dim=1)
        if h.train_drop_rate > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the per-batch seeded global RNG
            generator = torch.Generator().manual_seed(seed)
            dropped = random_drop(present[keep].cpu(), h.train_drop_rate, generator).to(present.device)
            present = present.clone()
            present[keep] = dropped
        if h.missingness_balance:
            if self._balance_rates is None:
                raise RuntimeError("missingness_balance: the rates are fitted by setup('fit')")
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the per-batch seeded global RNG
            rates = self._balance_rates[batch["index"].long().cpu()][keep.cpu()]
            dropped = balanced_drop(present[keep].cpu(), rates, torch.Generator().manual_seed(seed))
            present = present.clone()
            present[keep] = dropped.to(present.device)
        if not bool(keep.all()):
            inputs = _select(inputs, keep)
            present, target = present[keep], target[keep]
            index = batch["index"][keep]
        else:
            index = batch["index"]
        if present.shape[0] == 0:
            return None
        out = self.net(inputs, present)
        l_task = self.task_loss(out.logits, target)
        terms: dict[str, torch.Tensor] = {"l_task": l_task}
        loss = l_task
        if out.aux_logits and h.aux_weight > 0:
            l_aux = self.aux_loss(out, present, target)
            terms["l_aux"] = l_aux
            loss = loss + h.aux_weight * l_aux
        if self.projections and h.distill_weight > 0:
            l_distill = self.distill_loss(out, present, index)
            terms["l_distill"] = l_distill
            loss = loss + h.distill_weight * l_distill
        if self.features.teacher_logits is not None and h.kd_weight > 0:
            teacher = self.features.teacher_logits[index.cpu()].to(out.logits.device)
            l_kd = logit_kl_loss(out.logits, teacher, h.kd_temperature,
                                 multilabel=self.structure["task"] == "multilabel")
            terms["l_kd"] = l_kd
            loss = loss + h.kd_weight * l_kd
        terms["total"] = loss
        if not self.check_finite(terms, batch_idx):
            return None
        self.update_metrics("train", out.logits.detach(), target)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True,
                      batch_size=present.shape[0])
        self.log_progress(loss)
        self.mark_trained(present.shape[0])
        return {"loss": loss}

    def aux_loss(self, out: NetOutput, present: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aux_task_loss(out, present, target, self.input_names, self.task_loss)

    def distill_loss(self, out: NetOutput, present: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return teacher_distill_loss(out, present, index, self.input_names, self.projections, self.features)

    def forward(self, batch: dict[str, Any], present: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a batch of patient rows (``present`` overrides the natural presence)."""
        assert self.net is not None
        inputs, natural = self.batch_inputs(batch)
        mask = natural if present is None else present.to(natural.device) & natural
        return self.net(inputs, mask).logits

    # ------------------------------------------------------------------ metrics
    def configure_metrics(self) -> None:
        if hasattr(self, "stage_metrics"):
            return
        n = len(self.structure["label_names"])
        make = (lambda: multilabel_metrics(n)) if self.structure["task"] == "multilabel" \
            else (lambda: classification_metrics(n))
        self.stage_metrics = StageMetrics(make).to(self.device)

    def update_metrics(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.configure_metrics()
        probs = logits.float().sigmoid() if self.structure["task"] == "multilabel" else logits.float().softmax(-1)
        self.stage_metrics.of(stage).update(probs, target.long())

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> torch.Tensor:
        logits = self(batch)
        loss = self.task_loss(logits, batch["target"])
        self.update_metrics(stage, logits, batch["target"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val",
                 batch_size=logits.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def _log_stage(self, stage: str) -> None:
        self.configure_metrics()
        if self._trainer is not None and self.trainer.sanity_checking:
            self.stage_metrics.of(stage).reset()  # a few sanity batches: no false warnings
            return
        results = self.stage_metrics.results(stage, self.structure["label_names"])
        if results:
            self.log_dict(results, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_stage("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict_rows(self, rows: np.ndarray | torch.Tensor, present: torch.Tensor | None = None,
                     batch_size: int = 512) -> torch.Tensor:
        """Probabilities (sigmoid or softmax) for table ``rows`` from the cached features;
        ``present`` (len(rows) x M bool) restricts the inputs each patient has."""
        if self.table is None:
            raise RuntimeError("MedMIX.predict_rows: attach(datamodule) first")
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        out = []
        with self._eval_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = patient_batch(self.table, chunk, self.device)
                mask = None if present is None else present[start:start + batch_size]
                logits = self(batch, mask)
                out.append(logits.sigmoid() if self.structure["task"] == "multilabel" else logits.softmax(-1))
        return torch.cat(out).cpu() if out else torch.zeros(0, len(self.structure["label_names"]))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    # ------------------------------------------------------------------ export
    def export_modules(self) -> dict[str, BackboneExport]:
        """MedMIX trains no backbone worth exporting on its own (its experts are inputs): the
        deployable model is written by :func:`midol.fusion.export.export_deployable`."""
        return {}

    def deployable(self) -> nn.Module:
        """Experts + network, without teacher or projections (see :mod:`midol.fusion.export`)."""
        from midol.fusion.export import MedMIXDeployable

        assert self.net is not None
        return MedMIXDeployable(self.experts, self.expert_recipes, self.net)

    def on_fit_end(self) -> None:
        report_best_checkpoint(self)  # the best validation macro AUC, its epoch and file

    def on_fit_start(self) -> None:
        rank_zero_info(self.describe())

    def describe(self) -> str:
        """One paragraph: inputs, experts, teacher and parameter counts."""
        assert self.net is not None
        experts = {m: [r["name"] for r in rs] for m, rs in self.expert_recipes.items()}
        trainable = sum(p.numel() for p in self.net.parameters())
        frozen = sum(p.numel() for p in self.experts.parameters())
        teachers = {m: t.name for m, t in self.teacher_specs.items()}
        return (f"MedMIX: inputs {self.input_names}; experts {experts}; teachers {teachers or 'none'}; "
                f"fusion network {trainable:,} parameters, experts {frozen:,} (frozen: "
                f"{not self.hparams.finetune_experts}); distillation projections "
                f"{sum(p.numel() for p in self.projections.parameters()):,} (training only)")


def _select(inputs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, list):
            out[name] = [v[keep] for v in value]
        elif isinstance(value, dict):
            out[name] = {k: v[keep] for k, v in value.items()}
        else:
            out[name] = value[keep]
    return out
