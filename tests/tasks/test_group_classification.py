"""Group-level classification (midol/tasks/group_classification.py, midol/data/bags.py) on real
ODIR patients, each patient's eyes one bag: the bags hold exactly the patient's present eyes,
padding never reaches the backbone, mean pooling equals the head on the mean of the eyes'
features, and a short fit on real images lowers the training loss."""

from __future__ import annotations

import csv
import inspect
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from midol.data.bags import BagDataModule, BagDataset
from midol.tasks.group_classification import (
    GroupClassificationModule,
    GroupClassificationModuleOptions,
)
from tests.helpers.finetune import quick_trainer, tiny_backbone_args
from tests.helpers.paths import SHARED_DATA

ODIR = SHARED_DATA / "fundus" / "odir_patients"
SIZE = 32


@pytest.fixture(scope="module")
def odir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """A seeded sample of real ODIR patients (24 train, 8 val, 8 test) in their CSV layout,
    with at least two one-eye patients among them."""
    if not (ODIR / "patients.csv").is_file():
        pytest.skip(f"{ODIR} not found (needs the project's shared data folder ../shared/data)")
    with open(ODIR / "patients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(0)
    picked: list[dict[str, str]] = []
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        pool = [r for r in rows if r["split"] == split]
        picked += [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
    one_eye = [r for r in rows if r["split"] == "train" and not (r["left_image"] and r["right_image"])]
    picked[:2] = one_eye[:2]
    path = tmp_path_factory.mktemp("odir") / "patients.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    return path, picked


def _datamodule(manifest: Path, **kwargs: Any) -> BagDataModule:
    args: dict[str, Any] = dict(label_columns=["N"], image_columns=["left_image", "right_image"],
                                root=str(ODIR), image_size=SIZE, batch_size=4, num_workers=0,
                                drop_last=False)
    args.update(kwargs)
    return BagDataModule(str(manifest), **args)


def test_bags_hold_each_patients_present_eyes(odir, tmp_path: Path) -> None:
    manifest, rows = odir
    dm = _datamodule(manifest)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == ["0", "1"]
    train = [r for r in rows if r["split"] == "train"]
    assert dm.group_ids["train"] == [r["patient_id"] for r in train]
    by_id = {r["patient_id"]: r for r in train}
    seen, padded = [], 0
    for batch in dm.train_dataloader():
        assert batch["image"].shape[1:] == (2, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        for i, mask, target in zip(batch["index"].tolist(), batch["mask"], batch["target"], strict=True):
            r = by_id[dm.group_ids["train"][i]]
            assert mask.tolist() == sorted([bool(r["left_image"]), bool(r["right_image"])], reverse=True)
            assert int(target) == int(r["N"])
            seen.append(i)
        padded += int((~batch["mask"]).any(dim=1).sum())
        assert (batch["image"][~batch["mask"]] == 0).all()
    one_eye = sum(not (r["left_image"] and r["right_image"]) for r in train)
    assert sorted(seen) == list(range(len(train))) and padded == one_eye >= 2  # one-eye patients

    # the same bags from a per-image CSV (one row per eye, the patient's label on each)
    eyes = tmp_path / "eyes.csv"
    with open(eyes, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "N", "split"])
        for r in rows:
            for c in ("left_image", "right_image"):
                if r[c]:
                    w.writerow([r[c], r["patient_id"], r["N"], r["split"]])
    long = _datamodule(eyes, image_columns=None)
    long.setup("fit")
    assert long.group_ids == dm.group_ids and long.classes == dm.classes
    for k in ("train", "val", "test"):
        a, b = dm.datasets[k], long.datasets[k]
        assert [b_.tolist() for b_ in a.bags] == [b_.tolist() for b_ in b.bags]  # type: ignore[attr-defined]
        np.testing.assert_array_equal(a.targets, b.targets)  # type: ignore[attr-defined]
    with open(eyes, "a", newline="") as fh:  # an eye that disagrees with its patient's label
        csv.writer(fh).writerow([rows[0]["left_image"] or rows[0]["right_image"], rows[0]["patient_id"],
                                 1 - int(rows[0]["N"]), rows[0]["split"]])
    with pytest.raises(ValueError, match=f"group '{rows[0]['patient_id']}' has images with different labels"):
        _datamodule(eyes, image_columns=None).setup("fit")


def test_padding_never_reaches_the_backbone_and_mean_pooling_is_the_mean(odir) -> None:
    manifest, _ = odir
    dm = _datamodule(manifest)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    torch.manual_seed(0)
    model = GroupClassificationModule(num_classes=2, pooling="mean", linear_probe=True,
                                      **tiny_backbone_args()).eval()
    x, mask = batch["image"], batch["mask"]
    logits = model(x, mask)
    with torch.no_grad():
        for b in range(len(x)):  # restatement: the head on the mean of the real eyes' features
            feats = model.backbone(model.normalizer(x[b][mask[b]]))
            torch.testing.assert_close(logits[b], model.head(feats.mean(dim=0)), rtol=1e-5, atol=1e-6)
    garbage = x.clone()
    garbage[~mask] = 255  # padding content must not matter
    attn = GroupClassificationModule(num_classes=2, pooling="attention", **tiny_backbone_args()).eval()
    torch.testing.assert_close(attn(garbage, mask), attn(x, mask))
    weights = attn.attention(x, mask)
    assert (weights[~mask] == 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(x)))
    with pytest.raises(ValueError, match="cache_features"):
        GroupClassificationModule(num_classes=2, linear_probe=True, cache_features=True, **tiny_backbone_args())


def _train_loss(model: GroupClassificationModule, dm: BagDataModule) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(dm.datasets["train"], batch_size=32):
            losses.append(float(model.loss(model(b["image"], b["mask"]), b["target"], train=False)))
    return float(np.mean(losses))


def test_a_short_fit_on_real_patients_lowers_the_loss(odir, tmp_path: Path) -> None:
    manifest, _ = odir
    L.seed_everything(0, verbose=False)
    dm = _datamodule(manifest, batch_size=8)
    model = GroupClassificationModule(num_classes=2, pooling="attention", linear_probe=True, lr=1e-2,
                                      weight_decay=0.0, **tiny_backbone_args())
    dm.setup("fit")
    before = _train_loss(model, dm)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = quick_trainer(tmp_path, max_steps=45, max_epochs=15, limit_val_batches=None)
    trainer.fit(model, dm)
    after = _train_loss(model, dm)
    assert after < 0.8 * before, (before, after)  # measured 2026-12-08: 0.684 -> 0.272
    for k, v in model.backbone.state_dict().items():  # frozen: a linear probe of the bag
        torch.testing.assert_close(v, backbone[k], msg=k)
    results = trainer.test(model, dm, verbose=False)[0]
    assert set(results) >= {"test/loss", "test/acc", "test/auc"}

    fine = GroupClassificationModule(num_classes=2, pooling="mean", linear_probe=False, lr=1e-3,
                                     **tiny_backbone_args())
    start = {k: v.clone() for k, v in fine.backbone.state_dict().items()}
    quick_trainer(tmp_path / "ft", max_steps=1).fit(fine, _datamodule(manifest, batch_size=8))
    assert any(not torch.equal(v, start[k]) for k, v in fine.backbone.state_dict().items())


def test_options_protocol_names_the_init_arguments() -> None:
    init: dict[str, str] = {}
    for klass in reversed(GroupClassificationModule.__mro__):
        fn = klass.__dict__.get("__init__")
        if fn is not None and klass.__module__.startswith("midol."):
            init.update({n: str(p.annotation) for n, p in inspect.signature(fn).parameters.items()
                         if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)})
    fields: dict[str, str] = {}
    for klass in reversed(GroupClassificationModuleOptions.__mro__):
        fields.update({k: str(v) for k, v in klass.__dict__.get("__annotations__", {}).items()})
    assert fields == init


def test_the_preset_reads_every_odir_patient(odir) -> None:
    dm = BagDataModule(str(ODIR / "patients.csv"), label_columns=["N"],
                       image_columns=["left_image", "right_image"], image_size=SIZE, num_workers=0)
    dm.setup("fit")  # configs/finetune/odir_patients_group.yaml's data (the dataset's split column)
    assert dm.split_sizes() == {"train": 1120, "val": 160, "test": 320}
    assert sum(len(b) for b in dm.datasets["train"].bags) == 2091  # type: ignore[attr-defined]


def test_max_instances_subsamples_long_bags(odir) -> None:
    manifest, rows = odir
    dm = _datamodule(manifest, max_instances=1)
    dm.setup("fit")
    val = dm.datasets["val"]
    item = val[0]
    assert item["image"].shape == (1, 3, SIZE, SIZE) and item["mask"].tolist() == [True]
    first = val.images.load(int(val.bags[0][0]))  # type: ignore[attr-defined]
    torch.testing.assert_close(item["image"][0], dm.eval_transform(first))  # evaluation: the first eye
    train = dm.datasets["train"]
    two = next(i for i, b in enumerate(train.bags) if len(b) == 2)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    drawn = [int(train.members(two)[0]) for _ in range(20)]  # type: ignore[attr-defined]
    assert set(drawn) == set(train.bags[two].tolist())  # type: ignore[attr-defined]  # both eyes drawn over epochs
    torch.manual_seed(0)
    assert [int(train.members(two)[0]) for _ in range(20)] == drawn  # type: ignore[attr-defined]  # seeded
    # a long bag (e.g. a volume's slices): evenly spaced in evaluation, a sorted random subset in training
    long = BagDataset(val.images, [np.arange(10)], np.zeros(1, np.int64), dm.eval_transform, 4)  # type: ignore[attr-defined]
    assert long.members(0).tolist() == [0, 3, 6, 9]
    rand = BagDataset(val.images, [np.arange(10)], np.zeros(1, np.int64), dm.eval_transform, 4, "random")  # type: ignore[attr-defined]
    picked = rand.members(0)
    assert len(set(picked.tolist())) == 4 and picked.tolist() == sorted(picked.tolist())
    with pytest.raises(ValueError, match="max_instances must be >= 1"):
        _datamodule(manifest, max_instances=0)
