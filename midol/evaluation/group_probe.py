"""Group-level probes on frozen features: one prediction per group (a patient's images, a
volume's slices) from the embeddings of its images.

A group task (a suite task with ``label_level: group``) labels groups, not images. Its images are
embedded one by one (through the feature cache, like any task); then each group becomes one
sample, two ways:

* **mean** (:func:`mean_pool`): the mean of the group's image embeddings, read out by the
  ordinary protocols of :mod:`midol.evaluation.protocols` (kNN, the linear probe, few-shot draws
  of whole groups). ``midol eval`` runs ``knn``, ``linear`` and ``fewshot`` this way on a group
  task.
* **attention-MIL** (:func:`attention_mil_scores`, protocol ``mil``): gated attention pooling
  (Ilse et al. 2018, eq. 9; :class:`~midol.models.mil.AttentionMIL`) and a linear classifier,
  trained on the frozen image embeddings with one fixed recipe (:class:`MILRecipe`): features
  standardised with the training images' mean and sd; AdamW (lr 1e-3, weight decay 1e-4 as in
  Ilse et al.'s experiments), mini-batches of 32 groups, at most 200 epochs, early stop when the
  validation loss has not improved for 20 epochs and the weights of the best epoch kept. The validation groups are the task's validation split, or else 20 % of
  the training groups carved with the seed (stratified by class): the test groups are never
  seen. Nothing is tuned: the recipe is the same for every task and backbone, so the score
  measures the features, not a search.

Scores follow :mod:`midol.evaluation.protocols`: ``(G, C)`` class probabilities (binary: C = 2)
or ``(G, L)`` per-label probabilities for multilabel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from midol.data.splits import seeded_split
from midol.models.mil import AttentionMIL


@dataclass(frozen=True)
class GroupSplit:
    """The groups of one split.

    Attributes:
        ids: ``(G,)`` group ids, sorted.
        bag: ``(N,)`` the group (index into ``ids``) of every image.
        targets: ``(G,)`` class ids or ``(G, L)`` 0/1 labels, one per group.
    """

    ids: np.ndarray
    bag: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sizes(self) -> np.ndarray:
        """Images per group."""
        return np.bincount(self.bag, minlength=len(self.ids))


def group_split(groups: np.ndarray, targets: np.ndarray, where: str = "groups") -> GroupSplit:
    """The groups of images with ids ``groups`` ``(N,)`` and per-image ``targets``; a group's
    target is its images' target, which must be the same for all of them (``ValueError``
    naming the first group whose images disagree)."""
    groups = np.asarray(groups)
    targets = np.asarray(targets)
    if groups.ndim != 1 or len(groups) != len(targets):
        raise ValueError(f"{where}: need one group id per image, got {groups.shape} ids for "
                         f"{len(targets)} targets")
    if len(groups) == 0:
        raise ValueError(f"{where}: no images")
    ids, first, bag = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    group_targets = targets[first]
    flat = targets.reshape(len(targets), -1)
    differ = np.flatnonzero((flat != group_targets.reshape(len(ids), -1)[bag]).any(axis=1))
    if differ.size:
        g = str(ids[bag[differ[0]]])
        raise ValueError(f"{where}: the images of group {g!r} have different labels; a "
                         "group-level task needs one label per group")
    return GroupSplit(ids, bag.astype(np.int64), group_targets)


def mean_pool(x: np.ndarray, bag: np.ndarray, n_bags: int) -> np.ndarray:
    """``(G, D)`` float32: the mean of the rows of ``x`` ``(N, D)`` in each bag (every bag
    must hold at least one row)."""
    x = np.asarray(x, dtype=np.float64)
    counts = np.bincount(bag, minlength=n_bags)
    if len(counts) != n_bags or (counts == 0).any():
        raise ValueError(f"every one of the {n_bags} bags needs at least one image")
    sums = np.zeros((n_bags, x.shape[1]), dtype=np.float64)
    np.add.at(sums, bag, x)
    return (sums / counts[:, None]).astype(np.float32)


def pad_bags(x: np.ndarray | torch.Tensor, bag: np.ndarray, n_bags: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, M, D)`` float32 bags (M = the largest bag, padding zeros) and their ``(G, M)`` mask
    from instance rows ``x`` ``(N, D)``, instances in their order within each bag."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    bag_t = torch.as_tensor(bag, dtype=torch.long)
    counts = torch.bincount(bag_t, minlength=n_bags)
    if len(counts) != n_bags or bool((counts == 0).any()):
        raise ValueError(f"every one of the {n_bags} bags needs at least one image")
    order = torch.argsort(bag_t, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(bag_t)) - starts[bag_t[order]]
    out = torch.zeros(n_bags, int(counts.max()), xt.shape[1])
    mask = torch.zeros(n_bags, int(counts.max()), dtype=torch.bool)
    out[bag_t[order], slot] = xt[order]
    mask[bag_t[order], slot] = True
    return out, mask


@dataclass(frozen=True)
class MILRecipe:
    """The one fixed attention-MIL training recipe (see the module docstring)."""

    hidden: int = 128
    gated: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_bags: int = 32
    max_epochs: int = 200
    patience: int = 20
    val_fraction: float = 0.2


@dataclass
class MILResult:
    """Test scores of an attention-MIL probe with how it was trained.

    Attributes:
        scores: ``(G_test, C)`` probabilities (``(G_test, L)`` for multilabel).
        epochs: Epochs run (early stop included).
        best_epoch: The epoch whose weights scored the test groups (1-based).
        val_loss: Validation loss at ``best_epoch``.
        validation: ``"val split"`` or ``"carved: K of the training groups"``.
    """

    scores: np.ndarray
    epochs: int
    best_epoch: int
    val_loss: float
    validation: str


class _MILClassifier(nn.Module):
    def __init__(self, dim: int, outputs: int, recipe: MILRecipe) -> None:
        super().__init__()
        self.pool = AttentionMIL(dim, recipe.hidden, recipe.gated)
        self.head = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x, mask)[0])


def _check(x: np.ndarray, bag: np.ndarray, y: np.ndarray, task_type: str, num_classes: int,
           name: str) -> None:
    if x.ndim != 2 or len(x) != len(bag):
        raise ValueError(f"{name}: features must be (N, D) with one bag index per row, got "
                         f"{x.shape} and {len(bag)} indices")
    n_bags = int(bag.max()) + 1 if len(bag) else 0
    if len(y) != n_bags:
        raise ValueError(f"{name}: {len(y)} group labels for {n_bags} bags")
    if task_type == "multilabel":
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise ValueError(f"{name}: multilabel labels must be (G, {num_classes}), got {y.shape}")
    elif y.ndim != 1 or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"{name}: labels must be (G,) class ids in [0, {num_classes})")


def attention_mil_scores(
    train_x: np.ndarray, train_bag: np.ndarray, train_y: np.ndarray,
    test_x: np.ndarray, test_bag: np.ndarray,
    task_type: str, num_classes: int,
    val_x: np.ndarray | None = None, val_bag: np.ndarray | None = None,
    val_y: np.ndarray | None = None, seed: int = 0, recipe: MILRecipe = MILRecipe(),
) -> MILResult:
    """Train gated attention-MIL on frozen instance features and score the test groups.

    Args:
        train_x / test_x / val_x: ``(N, D)`` image embeddings.
        train_bag / test_bag / val_bag: ``(N,)`` each image's group index ``0..G-1``.
        train_y / val_y: ``(G,)`` class ids or ``(G, L)`` 0/1 labels per group.
        task_type: ``binary``, ``multiclass``, ``ordinal`` (as multiclass) or ``multilabel``.
        num_classes: C (or L).
        seed: Initialisation, mini-batch order and the validation carve.
        recipe: The training recipe (the default is the one ``midol eval`` uses).
    """
    multilabel = task_type == "multilabel"
    if task_type not in ("binary", "multiclass", "ordinal", "multilabel"):
        raise ValueError(f"unknown task type {task_type!r}")
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_bag, test_bag = np.asarray(train_bag, np.int64), np.asarray(test_bag, np.int64)
    train_y = np.asarray(train_y)
    _check(train_x, train_bag, train_y, task_type, num_classes, "train")
    if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1] or len(test_x) != len(test_bag):
        raise ValueError(f"test features must be (N, {train_x.shape[1]}) with one bag index per row")
    mean = train_x.mean(axis=0)
    sd = train_x.std(axis=0)
    sd[sd == 0] = 1.0  # a constant feature stays 0, as StandardScaler does

    def std(x: np.ndarray) -> np.ndarray:
        return (x - mean) / sd

    n_train = int(train_bag.max()) + 1
    if val_x is not None:
        if val_bag is None or val_y is None:
            raise ValueError("val_x needs val_bag and val_y")
        val_x, val_bag, val_y = np.asarray(val_x, np.float32), np.asarray(val_bag, np.int64), np.asarray(val_y)
        _check(val_x, val_bag, val_y, task_type, num_classes, "val")
        fit_bags = np.arange(n_train)
        vx, vm = pad_bags(std(val_x), val_bag, len(val_y))
        vy = val_y
        validation = "val split"
    else:
        strata = None if multilabel else train_y
        fit_bags, held = seeded_split(n_train, [recipe.val_fraction], seed, strata)
        if len(held) == 0 or len(fit_bags) == 0:
            raise ValueError(f"attention-MIL: {n_train} training groups are too few to carve "
                             f"{recipe.val_fraction:.0%} as validation; give a val split")
        keep = np.isin(train_bag, held)
        remap = np.full(n_train, -1, np.int64)
        remap[held] = np.arange(len(held))
        vx, vm = pad_bags(std(train_x[keep]), remap[train_bag[keep]], len(held))
        vy = train_y[held]
        validation = f"carved: {len(held)} of the {n_train} training groups"
    tx, tm = pad_bags(std(train_x), train_bag, n_train)
    tx, tm, ty_all = tx[fit_bags], tm[fit_bags], train_y[fit_bags]
    ex, em = pad_bags(std(test_x), test_bag, int(test_bag.max()) + 1)

    def target(y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.float32 if multilabel else torch.long)

    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    ty, vyt = target(ty_all), target(vy)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays untouched
        torch.manual_seed(seed)
        model = _MILClassifier(train_x.shape[1], num_classes, recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
        epoch = 0
        for epoch in range(1, recipe.max_epochs + 1):
            model.train()
            for idx in torch.randperm(len(ty), generator=gen).split(recipe.batch_bags):
                # trim the padding this mini-batch does not need (bags are mostly short)
                width = int(tm[idx].sum(dim=1).max())
                loss = loss_fn(model(tx[idx, :width], tm[idx, :width]), ty[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model(vx, vm), vyt))
            if val_loss < best[0]:
                best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= recipe.patience:
                break
        model.load_state_dict(best[2])
        model.eval()
        with torch.no_grad():
            logits = model(ex, em)
    scores = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return MILResult(scores.double().numpy(), epoch, best[1], best[0], validation)
