"""The evaluation loop of ``midol eval``: every task x backbone read-out x protocol setting x
seeded draw, scored on the task's test split, summarised with bootstrap CIs and compared in
pairs (same test samples, same draws, same resamples).

Protocols (their settings are named in every table and ``runs.csv`` row):

* ``knn``: DINO's weighted kNN on the full training split, one setting per ``k``.
* ``linear``: multinomial logistic regression on the full training split (its C chosen on the
  validation split, inner CV when the task has none).
* ``fewshot``: the same linear probe on ``k`` labelled examples per class (``shots=k``) and on
  label fractions (``fraction=f``), ``seeds`` draws each; its C comes from inner CV on the
  draw itself (the validation split's labels would not exist in a few-label setting). Draws depend only on the labels,
  the patients and the seed, so every backbone is scored on the same draws.
* ``mil``: group tasks only (``label_level: group``): gated attention-MIL trained on the frozen
  image embeddings of each group with one fixed recipe (:mod:`midol.evaluation.group_probe`),
  setting ``attention``, once per seed ``0..seeds-1`` (the initialisation and mini-batch order). On a group task every protocol scores one prediction per group: kNN,
  linear and few-shot read the mean of the group's image embeddings, draws and bootstrap
  resamples are of groups. An image-level task has no ``mil`` setting.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from midol.evaluation import stats
from midol.evaluation.features import Embedder, LoadedBackbone
from midol.evaluation.fewshot import Draw, draw_subset, skipped_shots
from midol.evaluation.group_probe import attention_mil_scores, mean_pool
from midol.evaluation.metrics import METRICS, metric_values
from midol.evaluation.protocols import knn_scores, linear_scores
from midol.evaluation.suite import Suite, TaskData, load_task

PROTOCOLS = ("knn", "linear", "fewshot", "mil")


class EvalWarning(UserWarning):
    """Something ``midol eval`` skipped or changed (a k a class cannot fill, a size)."""


@dataclass
class Options:
    """What to run; every field is a ``midol eval`` option (help text there)."""

    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: int = 5
    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    knn_temperature: float = 0.07
    bootstrap: int = 1000
    metric: str = "auc"
    baseline: str | None = None
    pretrain_groups: bool = False


@dataclass(frozen=True)
class Setting:
    """One protocol setting: ``knn k=20``, ``linear full``, ``fewshot shots=5``, ..."""

    protocol: str
    name: str
    x: float | None = None  # shots or fraction (label-efficiency plots); None for full data

    @property
    def key(self) -> str:
        return f"{self.protocol} {self.name}"


@dataclass(frozen=True)
class Row:
    """One backbone read out one way: a line of every table. With pre-training groups, a row
    holds the backbones ``LABEL@SEED`` of every seed (``members``, ``seeds`` in order)."""

    label: str
    readout: str
    architecture: str
    reference: bool
    multi_readout: bool
    members: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ("",)

    @property
    def key(self) -> str:
        return f"{self.label} [{self.readout}]" if self.multi_readout else self.label


@dataclass
class Results:
    """Everything the report is written from."""

    rows: list[Row]
    settings: dict[str, list[Setting]]  # per task, in run order
    runs: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[tuple[str, str, str], dict[str, stats.Summary]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def targets_of(task: TaskData, split: str) -> np.ndarray:
    """The labels a split is scored on: one per image, or one per group for a group task."""
    return task.group_splits[split].targets if task.group_level else task.splits[split].targets


def settings_for(task: TaskData, options: Options) -> tuple[list[tuple[Setting, list[Draw]]], list[str]]:
    """The protocol settings of a task with their draws (feature-independent), and what was
    skipped (a k that a class cannot fill). A group task's draws are of groups."""
    y = targets_of(task, "train")
    groups = None if task.group_level else task.groups.get("train")  # a group is one sample
    full = Draw("full", None, 0, np.arange(len(y)))
    out: list[tuple[Setting, list[Draw]]] = []
    skipped: list[str] = []
    if "knn" in options.protocols:
        out += [(Setting("knn", f"k={k}"), [full]) for k in options.knn_k]
    if "linear" in options.protocols:
        out.append((Setting("linear", "full"), [full]))
    if "fewshot" in options.protocols:
        for k in options.shots:
            reasons = skipped_shots(y, task.type, k, groups)
            if reasons:
                skipped.append(f"task {task.spec.name!r}: shots={k} skipped: {'; '.join(reasons)}")
                continue
            out.append((Setting("fewshot", f"shots={k}", float(k)),
                        [draw_subset(y, task.type, shots=k, seed=s, groups=groups)
                         for s in range(options.seeds)]))
        for f in options.fractions:
            if f >= 1.0:  # the full training split: the linear protocol's setting
                continue
            out.append((Setting("fewshot", f"fraction={f:g}", float(f)),
                        [draw_subset(y, task.type, fraction=f, seed=s, groups=groups)
                         for s in range(options.seeds)]))
    if "mil" in options.protocols and task.group_level:
        # a trained pooling is stochastic: ``seeds`` initialisations (and validation carves), so
        # its cell carries the spread between them as few-shot cells carry their draws'
        out.append((Setting("mil", "attention"),
                     [Draw("full", None, s, full.indices) for s in range(options.seeds)]))
    return out, skipped


def _predict(setting: Setting, task: TaskData, feats: dict[str, np.ndarray], draw: Draw,
             options: Options, knn_k: int | None) -> np.ndarray:
    """Test scores of one setting and draw; ``feats`` are per image, or per group (the mean of
    its images) for a group task."""
    y = targets_of(task, "train")[draw.indices]
    x = feats["train"][draw.indices]
    if setting.protocol == "knn":
        assert knn_k is not None
        return knn_scores(x, y, feats["test"], task.type, task.num_classes, k=knn_k,
                          temperature=options.knn_temperature)
    # A few-shot draw is all the labels the setting has: its C comes from inner CV on the draw
    # (a fixed C when a class has one example), never from the task's full validation split.
    val = "val" in feats and setting.protocol == "linear"
    result = linear_scores(x, y, feats["test"], task.type, task.num_classes,
                           val_x=feats["val"] if val else None,
                           val_y=targets_of(task, "val") if val else None, seed=draw.seed)
    return result.scores


def _predict_mil(task: TaskData, instances: dict[str, np.ndarray], seed: int) -> tuple[np.ndarray, str]:
    """Attention-MIL test scores of a group task from its image embeddings, and a note on how
    the fixed recipe ran (epochs, validation groups)."""
    g = task.group_splits
    val = "val" in instances
    result = attention_mil_scores(
        instances["train"], g["train"].bag, g["train"].targets, instances["test"], g["test"].bag,
        task.type, task.num_classes, val_x=instances["val"] if val else None,
        val_bag=g["val"].bag if val else None, val_y=g["val"].targets if val else None, seed=seed)
    return result.scores, (f"best epoch {result.best_epoch} of {result.epochs}, validation "
                           f"{result.validation}, loss {result.val_loss:.4f}")


def evaluate(suite: Suite, backbones: list[LoadedBackbone], embedder: Embedder,
             options: Options, baseline: str | None = None,
             progress: Callable[[str], None] | None = None) -> Results:
    """Run every task of ``suite`` for every backbone read-out (see the module docstring)."""
    rows = build_rows(backbones, options.pretrain_groups)
    results = Results(rows, {})
    say = progress or (lambda _m: None)
    for spec in suite.tasks:
        task = load_task(spec, suite.data_root)
        plan, skipped = settings_for(task, options)
        for message in skipped:
            warnings.warn(message, EvalWarning, stacklevel=2)
            results.notes.append(message)
        if not plan:
            message = (f"task {spec.name!r}: none of the protocols {options.protocols} applies "
                       "(mil needs label_level: group)")
            warnings.warn(message, EvalWarning, stacklevel=2)
            results.notes.append(message)
        results.settings[spec.name] = [s for s, _ in plan]
        y_test = targets_of(task, "test")
        results.tasks[spec.name] = {
            "modality": spec.modality, "type": spec.type, "classes": task.class_names,
            "split_rule": spec.split_rule, "label_level": spec.label_level,
            "sizes": {k: len(targets_of(task, k)) for k in task.splits},
            "images": {k: len(v) for k, v in task.splits.items()},
            "patients": {k: int(len(set(g.tolist()))) for k, g in task.groups.items() if g is not None},
        }
        feats: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (label, readout) -> split -> N x D
        instances: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # group task: per image
        for b in backbones:
            size = b.image_size
            if spec.image_size and int(spec.image_size) != size:
                message = (f"task {spec.name!r}: image_size {spec.image_size} differs from backbone "
                           f"{b.ref.label!r}'s {size}; the backbone's size is used")
                warnings.warn(message, EvalWarning, stacklevel=2)
                results.notes.append(message)
            by_split = {k: embedder.embed(b, split, size, f"{spec.name} {k} / {b.ref.label}")
                        for k, split in task.splits.items()}
            for readout in b.readouts:
                feats[(b.ref.label, readout)] = {k: v[readout] for k, v in by_split.items()}
                if task.group_level:  # one sample per group: the mean of its images' embeddings
                    instances[(b.ref.label, readout)] = feats[(b.ref.label, readout)]
                    feats[(b.ref.label, readout)] = {
                        k: mean_pool(v, task.group_splits[k].bag, len(task.group_splits[k]))
                        for k, v in instances[(b.ref.label, readout)].items()}
        strata = None if spec.type == "multilabel" else y_test
        weights = stats.bootstrap_weights(len(y_test), options.bootstrap, seed=0, strata=strata)
        seed_idx = {n: stats.seed_resamples(n, options.bootstrap) for n in {len(r.members) for r in rows}}
        scores: dict[tuple[str, str], list[list[np.ndarray]]] = {}
        total = len(plan) * len(rows)
        bar = tqdm(total=total, desc=f"{spec.name}: probes", unit="setting", disable=None, leave=False)
        for setting, draws in plan:
            knn_k = int(setting.name.split("=")[1]) if setting.protocol == "knn" else None
            for row in rows:
                members = []
                for member in row.members:
                    per_draw = []
                    for draw in draws:
                        if setting.protocol == "mil":
                            s, how = _predict_mil(task, instances[(member, row.readout)], draw.seed)
                            results.notes.append(f"{spec.name} {setting.key} / {member} "
                                                 f"[{row.readout}] seed {draw.seed}: {how}")
                        else:
                            s = _predict(setting, task, feats[(member, row.readout)], draw, options, knn_k)
                        per_draw.append(s)
                        for metric, value in metric_values(y_test, s, spec.type).items():
                            results.runs.append({
                                "task": spec.name, "row": row.key, "backbone": member,
                                "readout": row.readout, "protocol": setting.protocol,
                                "setting": setting.name, "seed": draw.seed,
                                "train_size": int(len(draw.indices)), "metric": metric,
                                "value": float(value)})
                    members.append(per_draw)
                scores[(setting.key, row.key)] = members
                results.summaries[(spec.name, setting.key, row.key)] = stats.summarize_seeds(
                    y_test, members, spec.type, weights, seed_idx[len(members)])
                bar.update(1)
        bar.close()
        say(f"{spec.name}: {len(plan)} settings x {len(rows)} rows scored")
        for setting, _ in plan:
            for row, other, kind, note in pairs(rows, baseline):
                mine, theirs = _paired_members(row, other, scores[(setting.key, row.key)],
                                               scores[(setting.key, other.key)])
                if not mine:
                    note = f"no common pre-training seed with {other.key}"
                    results.notes.append(f"{spec.name} {setting.key}: {row.key}: {note}")
                    continue
                resampled = stats.paired_seeds(y_test, mine, theirs, spec.type, weights,
                                               stats.seed_resamples(len(mine), options.bootstrap),
                                               metrics=[options.metric])
                point, boot = resampled[options.metric]
                results.comparisons.append({
                    "task": spec.name, "setting": setting.key, "row": row.key,
                    "against": other.key, "kind": kind, "metric": options.metric,
                    "seeds": len(mine), "note": note, "_point": point, "_boot": boot,
                    **_comparison_fields(stats.compare(point, boot, options.metric))})
    _pool(results, options)
    return results


def build_rows(backbones: list[LoadedBackbone], groups: bool) -> list[Row]:
    """One row per backbone read-out; with ``groups``, backbones labelled ``NAME@SEED`` share
    the row ``NAME`` (members in seed order)."""
    def split(label: str) -> tuple[str, str]:
        if groups and "@" in label:
            name, seed = label.rsplit("@", 1)
            return name, seed
        return label, ""

    order: list[tuple[str, str]] = []
    info: dict[tuple[str, str], list[tuple[str, str, LoadedBackbone]]] = {}
    for b in backbones:
        name, seed = split(b.ref.label)
        for readout in b.readouts:
            key = (name, readout)
            if key not in info:
                order.append(key)
                info[key] = []
            info[key].append((seed, b.ref.label, b))
    rows = []
    for name, readout in order:
        members = sorted(info[(name, readout)], key=lambda m: (len(m[0]), m[0]))
        first = members[0][2]
        archs = {m[2].architecture for m in members}
        if len(archs) != 1:
            raise ValueError(f"the seeds of row {name!r} have different architectures")
        rows.append(Row(name, readout, first.architecture, all(m[2].ref.reference for m in members),
                        len(first.readouts) > 1, tuple(m[1] for m in members),
                        tuple(m[0] for m in members)))
    return rows


def _paired_members(row: Row, other: Row, a: list[list[np.ndarray]],
                    b: list[list[np.ndarray]]) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Members of two rows paired by pre-training seed (the seeds both have); a row without
    seeds (one backbone, not ``NAME@SEED``) pairs with each member of the other."""
    common = [s for s in row.seeds if s in other.seeds]
    if common:
        return ([a[row.seeds.index(s)] for s in common], [b[other.seeds.index(s)] for s in common])
    if other.seeds == ("",):
        return a, [b[0]] * len(a)
    if row.seeds == ("",):
        return [a[0]] * len(b), b
    return [], []


def pairs(rows: list[Row], baseline: str | None) -> Iterable[tuple[Row, Row, str, str]]:
    """(row, other, kind, note): every non-reference row against the random init of its
    architecture (same read-out) and against the baseline (same read-out when it has it)."""
    for row in rows:
        refs = [r for r in rows if r.reference and r.architecture == row.architecture
                and r.readout == row.readout]
        for ref in refs[:1]:
            if not row.reference:
                yield row, ref, "random init", ""
        if baseline is None or row.label == baseline:
            continue
        candidates = [r for r in rows if r.label == baseline]
        same = [r for r in candidates if r.readout == row.readout]
        if same:
            yield row, same[0], "baseline", ""
        elif candidates:
            yield row, candidates[0], "baseline", (f"read out differently: {row.readout} vs "
                                                   f"{candidates[0].readout}")


def _comparison_fields(c: stats.Comparison) -> dict[str, Any]:
    return {"diff": c.diff, "lo": c.lo, "hi": c.hi, "p": c.p, "verdict": c.verdict}


def _pool(results: Results, options: Options) -> None:
    """Suite-level comparisons: per (setting, row, against), the mean over tasks of the paired
    differences (tasks resampled independently)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for c in results.comparisons:
        groups.setdefault((c["setting"], c["row"], c["against"], c["kind"]), []).append(c)
    pooled = []
    for (setting, row, against, kind), items in groups.items():
        point, boot = stats.pool([(c["_point"], c["_boot"]) for c in items])
        comparison = stats.compare(point, boot, options.metric, n_tasks=len(items))
        pooled.append({"task": "(suite)", "setting": setting, "row": row, "against": against,
                       "kind": kind, "metric": options.metric, "n_tasks": len(items),
                       "seeds": min(c["seeds"] for c in items),
                       "note": next((c["note"] for c in items if c["note"]), ""),
                       **_comparison_fields(comparison)})
    for c in results.comparisons:
        c.pop("_point")
        c.pop("_boot")
    results.comparisons += pooled


def metric_names(task_type: str) -> tuple[str, ...]:
    return METRICS[task_type]
