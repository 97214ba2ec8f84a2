"""Online k-NN accuracy of the pre-training features on small labelled sets.

The routing monitor says whether experts specialise; only a labelled probe says whether the
features get better. This callback scores the method's ``embed()`` features (M-IDoL: the EMA
teacher's backbone; DEX: the director) with midol eval's weighted k-NN
(:func:`midol.evaluation.protocols.knn_scores`: the classifier of Wu et al. 2018 as used by DINO,
Caron et al. 2021, ``eval_knn.py``, and solo-learn: cosine similarity to the ``k`` nearest
training features, votes weighted by ``exp(sim / T)``); a test image's class is the top-scoring
one. Logged per set as ``knn/<name>_acc`` every ``every_n_epochs`` training epochs
(pre-training has no validation loop), plus once before training when ``at_start`` (the
random-init reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from midol.data.labelled import LabelledDataModule, LabelledSource
from midol.evaluation.protocols import knn_scores


@dataclass
class KNNSet:
    """One labelled set: ``train`` is the memory bank, ``test`` is scored; without ``test``, a
    seeded stratified ``test_fraction`` of ``train`` is held out.

    Attributes:
        name: key in the logged metric (``knn/<name>_acc``).
        train / test: :class:`~midol.data.labelled.LabelledSource` fields (``path``, ``kind``,
            ``split``, ...); multi-class labels.
        test_fraction: held-out fraction when ``test`` is not given.
        max_images: use at most this many images of each split (in the split's order), to
            bound the cost.
        datamodule_kwargs: other :class:`~midol.data.labelled.LabelledDataModule` arguments
            (e.g. ``classes``, ``split_seed``).
    """

    name: str
    train: dict[str, Any]
    test: dict[str, Any] | None = None
    test_fraction: float = 0.3
    max_images: int = 2000
    datamodule_kwargs: dict[str, Any] = field(default_factory=dict)


def input_size(module: Any) -> int:
    """The side the module's backbone takes: its ``image_size`` or ``img_size`` (DEX) option,
    else ``backbone_kwargs.img_size`` (M-IDoL), else 224."""
    h = getattr(module, "hparams", {}) or {}
    size = h.get("image_size") or h.get("img_size") or (h.get("backbone_kwargs") or {}).get("img_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size or 224)


class KNNMonitor(L.Callback):
    """Log the weighted k-NN accuracy of ``pl_module.embed`` features on labelled sets.

    Args:
        sets: the labelled sets (:class:`KNNSet` fields).
        every_n_epochs: score after every this many training epochs (and after the last).
        at_start: also score before the first step (the initialisation's accuracy).
        k / temperature: the k-NN classifier's neighbours and temperature (DINO: 20, 0.07).
        image_size: side of the evaluation images (default: :func:`input_size` of the module).
        batch_size: images per forward pass.
    """

    def __init__(self, sets: list[dict[str, Any]], every_n_epochs: int = 1, at_start: bool = True,
                 k: int = 20, temperature: float = 0.07, image_size: int | None = None,
                 batch_size: int = 64) -> None:
        super().__init__()
        if not sets:
            raise ValueError("KNNMonitor needs at least one labelled set")
        if every_n_epochs < 1 or k < 1 or batch_size < 1:
            raise ValueError("every_n_epochs, k and batch_size must be >= 1")
        if not math.isfinite(temperature) or temperature <= 0:  # nan passes a plain `<= 0`
            raise ValueError(f"KNNMonitor temperature must be a finite number > 0, got {temperature}")
        self.sets = [s if isinstance(s, KNNSet) else KNNSet(**s) for s in sets]
        for spec in self.sets:
            if spec.max_images < 1:
                raise ValueError(f"KNNMonitor set {spec.name!r}: max_images must be >= 1, got "
                                 f"{spec.max_images}")
        self.every_n_epochs = every_n_epochs
        self.at_start = at_start
        self.k = k
        self.temperature = temperature
        self.image_size = image_size
        self.batch_size = batch_size
        self._data: dict[str, LabelledDataModule] = {}
        self.history: list[dict[str, float]] = []

    def _datamodule(self, spec: KNNSet, size: int) -> LabelledDataModule:
        if spec.name not in self._data:
            test = LabelledSource(**spec.test) if spec.test else None
            dm = LabelledDataModule(train=LabelledSource(**spec.train), val=test,
                                    val_fraction=0.0 if test else spec.test_fraction,
                                    image_size=size, train_augment=False, batch_size=self.batch_size,
                                    num_workers=0, drop_last=False,
                                    **spec.datamodule_kwargs)
            dm.setup("fit")
            self._data[spec.name] = dm
        return self._data[spec.name]

    @torch.no_grad()
    def _features(self, module: Any, dm: LabelledDataModule, stage: str, limit: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels, seen = [], [], 0
        for batch in dm._loader(stage, train=False):
            images = batch["image"][: limit - seen].to(module.device)
            feats.append(module.embed(images).float().cpu())
            labels.append(batch["target"][: limit - seen])
            seen += len(images)
            if seen >= limit:
                break
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, module: Any) -> dict[str, float]:
        """``{knn/<name>_acc: accuracy}`` of every set, the module in eval mode meanwhile."""
        size = self.image_size or input_size(module)
        was_training = module.training
        module.eval()
        out: dict[str, float] = {}
        try:
            for spec in self.sets:
                dm = self._datamodule(spec, size)
                train_x, train_y = self._features(module, dm, "train", spec.max_images)
                test_x, test_y = self._features(module, dm, "val", spec.max_images)
                num_classes = int(dm.num_classes)
                scores = knn_scores(train_x.numpy(), train_y.numpy(), test_x.numpy(),
                                    "binary" if num_classes == 2 else "multiclass", num_classes,
                                    k=self.k, temperature=self.temperature)
                pred = scores.argmax(axis=1)
                out[f"knn/{spec.name}_acc"] = float(np.mean(pred == test_y.numpy()))
        finally:
            module.train(was_training)
        return out

    def _score(self, trainer: L.Trainer, module: Any, when: str) -> None:
        if not hasattr(module, "embed"):
            raise TypeError(f"KNNMonitor needs a module with embed(images); {type(module).__name__} has none")
        results = self.evaluate(module)
        self.history.append({"epoch": float(trainer.current_epoch), **results})
        if when == "start":  # outside any hook that may call self.log
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
        else:
            module.log_dict(results, on_epoch=True, on_step=False)
        rank_zero_info(f"k-NN ({when}): " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.is_global_zero:
            self._score(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs == 0 or last:
            self._score(trainer, pl_module, f"epoch {epoch}")
