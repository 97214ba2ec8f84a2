"""Multi-class fine-tuning and linear probing on real images: a training step, metrics equal to a
recomputation from the model's predictions, frozen backbone, Mixup/CutMix, lr groups, caching."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from midol.data import LabelledDataModule, LabelledSource
from midol.tasks import ClassificationModule
from tests.helpers.finetune import SIZE, pretrain_checkpoint, quick_trainer, tiny_backbone_args
from tests.helpers.metrics import pair_auc


def xray_data(sample_data: Path, **overrides) -> LabelledDataModule:
    kwargs = dict(train=LabelledSource(str(sample_data / "xray")), val_fraction=0.3, image_size=SIZE,
                  batch_size=8, num_workers=0, split_seed=1)
    kwargs.update(overrides)
    return LabelledDataModule(**kwargs)


def predictions(module: ClassificationModule, dm: LabelledDataModule, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    probs, targets = [], []
    with torch.no_grad():
        for batch in dm._loader(stage, train=False):
            probs.append(module(batch["image"]).softmax(-1))
            targets.append(batch["target"])
    return torch.cat(probs), torch.cat(targets)


def test_finetune_step_on_real_xrays_and_metrics_match_predictions(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    module = ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), layer_decay=0.75, lr=1e-3, warmup_steps=1)
    dm = xray_data(sample_data)
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    results = trainer.validate(module, dm, verbose=False)[0]
    probs, targets = predictions(module, dm, "val")
    assert len(targets) == 18
    assert results["val/acc"] == pytest.approx((probs.argmax(-1) == targets).float().mean().item())
    hand_auc = [pair_auc(probs[:, c].tolist(), (targets == c).tolist()) for c in range(2)]
    # binary: both one-vs-rest AUCs are the same number, logged once (no auc_NORMAL/auc_PNEUMONIA)
    assert hand_auc[0] == pytest.approx(hand_auc[1], abs=1e-6)
    assert results["val/auc"] == pytest.approx(hand_auc[0], abs=1e-6)
    assert not any(k.startswith("val/auc_") for k in results)


def test_linear_probe_leaves_the_backbone_unchanged(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    probe = ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), linear_probe=True, lr=0.1, weight_decay=0.05)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    quick_trainer(tmp_path, max_steps=2).fit(probe, xray_data(sample_data))
    after = probe.state_dict()
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["head.linear.weight"], after["head.linear.weight"])
    probe.train()
    assert not probe.backbone.training and probe.head.training

    full = ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), lr=1e-2)
    before = {k: v.clone() for k, v in full.backbone.state_dict().items()}
    quick_trainer(tmp_path, max_steps=1).fit(full, xray_data(sample_data))
    assert any(not torch.equal(v, full.backbone.state_dict()[k]) for k, v in before.items())


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.seen: list[list[tuple[float, float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append([(g["lr"], g["lr_scale"]) for g in trainer.optimizers[0].param_groups])


def test_layer_decayed_lrs_follow_warmup_cosine_during_training(sample_data, tmp_path):
    module = ClassificationModule(num_classes=2, **tiny_backbone_args(), lr=1e-3, min_lr=0.0,
                                  layer_decay=0.5, warmup_steps=2, optimizer="sgd")
    record = RecordLR()
    quick_trainer(tmp_path, max_steps=4, callbacks=[record]).fit(module, xray_data(sample_data))
    assert isinstance(module.trainer.optimizers[0], torch.optim.SGD)
    expected_head = [5e-4, 1e-3, 1e-3, 5e-4]  # warm-up 1/2, 2/2; cosine over 2 steps: start, midpoint
    for step, groups in enumerate(record.seen):
        assert {round(scale, 6) for _, scale in groups} >= {1.0, 0.5 ** 5}  # head ... patch embed (5 ids)
        for lr, scale in groups:
            assert lr == pytest.approx(expected_head[step] * scale)


def test_mixup_cutmix_step_and_odd_batch_error(sample_data, tmp_path):
    module = ClassificationModule(num_classes=2, **tiny_backbone_args(), mixup_alpha=0.8,
                                  cutmix_alpha=1.0, label_smoothing=0.1)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, xray_data(sample_data))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/acc" not in trainer.callback_metrics  # mixed targets: no train accuracy
    x = torch.zeros(3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="even batch size"):
        module.augment(x, torch.tensor([0, 1, 0]))


def test_cached_features_give_the_same_logits_and_need_a_fixed_transform(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    results = []
    for cache in (False, True):
        torch.manual_seed(0)
        module = ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), linear_probe=True, cache_features=cache)
        trainer = quick_trainer(tmp_path, max_epochs=2, max_steps=-1, limit_val_batches=None)
        trainer.fit(module, xray_data(sample_data, train_augment=False))
        results.append(trainer.validate(module, xray_data(sample_data, train_augment=False), verbose=False)[0])
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    module = ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), linear_probe=True, cache_features=True)
    with pytest.raises(ValueError, match="train_augment: false"):
        quick_trainer(tmp_path).fit(module, xray_data(sample_data))
    with pytest.raises(ValueError, match="needs linear_probe"):
        ClassificationModule(num_classes=2, init_checkpoint=str(ckpt), cache_features=True)


def test_class_count_mismatch_is_a_clear_error(sample_data, tmp_path):
    module = ClassificationModule(num_classes=3, **tiny_backbone_args())
    with pytest.raises(ValueError, match="num_classes=3 but the data have 2 classes"):
        quick_trainer(tmp_path).fit(module, xray_data(sample_data))


@pytest.mark.parametrize("task", ["isic", "pneumoniamnist"])
def test_one_step_and_test_metrics_on_shared_data(task, shared_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    if task == "isic":
        dm = LabelledDataModule(train=LabelledSource(str(shared_data / "dermoscopy/isic_9class_180px")),
                                val_fraction=0.1, test_fraction=0.1, image_size=SIZE, batch_size=16,
                                num_workers=0)
        num_classes = 9
    else:
        npz = str(shared_data / "medmnist/pneumoniamnist.npz")
        dm = LabelledDataModule(train=LabelledSource(npz, split="train"), val=LabelledSource(npz, split="val"),
                                test=LabelledSource(npz, split="test"), image_size=SIZE, batch_size=16,
                                eval_batch_size=104, num_workers=0)
        num_classes = 2
    module = ClassificationModule(num_classes=num_classes, init_checkpoint=str(ckpt), linear_probe=True, lr=1e-2)
    trainer = quick_trainer(tmp_path, max_steps=1, limit_test_batches=1 if task == "pneumoniamnist" else None)
    trainer.fit(module, dm)
    test = trainer.test(module, dm, verbose=False)[0]
    assert 0 <= test["test/acc"] <= 1 and 0 <= test["test/auc"] <= 1
    if task == "isic":
        assert dm.split_sizes() == {"train": 432, "val": 54, "test": 54}
        assert all(f"test/auc_{c}" in test for c in dm.classes)  # 6 test images of every class
