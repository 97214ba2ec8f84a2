"""Multi-label classification on real images with labels from the sample corpus' metadata."""

from __future__ import annotations

import pytest
import torch

from midol.data import LabelledDataModule, LabelledSource
from midol.tasks import MultiLabelModule
from tests.helpers.finetune import SIZE, pretrain_checkpoint, quick_trainer
from tests.helpers.metrics import pair_auc
from tests.helpers.task_data import MULTILABELS, multilabel_manifest


def test_multilabel_step_and_per_label_auc(sample_data, tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    dm = LabelledDataModule(
        train=LabelledSource(str(multilabel_manifest(sample_data, tmp_path)), label_columns=MULTILABELS),
        task="multilabel", val_fraction=0.3, split_seed=0, image_size=SIZE, batch_size=16, num_workers=0,
    )
    module = MultiLabelModule(num_labels=3, init_checkpoint=str(ckpt), optimizer="sgd", lr=0.05, warmup_steps=1)
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    results = trainer.validate(module, dm, verbose=False)[0]

    module.eval()
    scores, targets = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            scores.append(module(batch["image"]).sigmoid())
            targets.append(batch["target"])
    scores, targets = torch.cat(scores), torch.cat(targets)
    assert targets.shape == (35, 3) and set(targets.unique().tolist()) == {0.0, 1.0}
    per_label = [pair_auc(scores[:, j].tolist(), (targets[:, j] == 1).tolist()) for j in range(3)]
    for name, value in zip(MULTILABELS, per_label):
        assert results[f"val/auc_{name}"] == pytest.approx(value, abs=1e-6)
    assert results["val/auc"] == pytest.approx(sum(per_label) / 3, abs=1e-6)


def test_label_count_mismatch_is_a_clear_error(sample_data, tmp_path):
    dm = LabelledDataModule(train=LabelledSource(str(multilabel_manifest(sample_data, tmp_path)), label_columns=MULTILABELS),
                            task="multilabel", image_size=SIZE, batch_size=8, num_workers=0)
    module = MultiLabelModule(num_labels=2, backbone="swin_tiny_patch4_window7_224",
                              backbone_kwargs=dict(img_size=SIZE, embed_dim=16, depths=(1, 1, 1, 1),
                                                   num_heads=(1, 2, 2, 4), window_size=2))
    with pytest.raises(ValueError, match="num_labels=2 but the data have 3 labels"):
        quick_trainer(tmp_path).fit(module, dm)
