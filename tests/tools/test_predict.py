"""`midol predict` (issue 27, item 4): a fine-tuned model's class probabilities on a folder or a
CSV manifest equal the module's own softmax / sigmoid on the same images, with the class names,
input size and architecture read from the checkpoint alone."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from midol.cli import main
from midol.data import EvalTransform, LabelledDataModule, LabelledSource
from midol.data.image_io import load_image
from midol.data.readers import scan_images
from midol.errors import UsageError
from midol.tasks import ClassificationModule, MultiLabelModule
from midol.tasks.base import TASK_KEY
from tests.helpers.finetune import SIZE, pretrain_checkpoint, quick_trainer
from tests.helpers.task_data import MULTILABELS, multilabel_manifest


def fine_tune(module, dm, root: Path, init: Path) -> Path:
    """A few training steps, the checkpoint saved, and the pre-training file it started from
    deleted: predict must not need it."""
    quick_trainer(root, max_steps=3).fit(module, dm)
    path = root / "finetuned.ckpt"
    module.trainer.save_checkpoint(path)
    init.unlink()
    return path


def module_probs(module, files: list[str], rule: str) -> np.ndarray:
    """The module's own probabilities: the evaluation crop at the training size, its forward."""
    module.eval()
    images = torch.stack([EvalTransform(SIZE)(load_image(f)) for f in files])
    with torch.no_grad():
        logits = module(images)
    return (logits.softmax(-1) if rule == "softmax" else logits.sigmoid()).double().numpy()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_predict_folder_equals_the_modules_softmax(sample_data, tmp_path_factory, tmp_path):
    init = tmp_path / "pretrain.ckpt"
    shutil.copy(pretrain_checkpoint(tmp_path_factory), init)
    torch.manual_seed(0)
    dm = LabelledDataModule(train=LabelledSource(str(sample_data / "xray")), val_fraction=0.3,
                            image_size=SIZE, batch_size=8, num_workers=0, split_seed=1)
    module = ClassificationModule(num_classes=2, init_checkpoint=str(init), lr=1e-2, warmup_steps=1)
    ckpt = fine_tune(module, dm, tmp_path, init)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)[TASK_KEY]
    assert saved["output_names"] == ["NORMAL", "PNEUMONIA"] and saved["image_size"] == SIZE

    out = tmp_path / "preds.csv"
    assert main(["predict", str(ckpt), "--images", str(sample_data / "xray"), "--out", str(out),
                 "--batch-size", "7", "--no-progress"]) == 0
    header, rows = read_csv(out)
    assert header == ["path", "prediction", "prob_NORMAL", "prob_PNEUMONIA"]
    files = scan_images(str(sample_data / "xray"))
    assert len(rows) == len(files) == 60
    assert [r["path"] for r in rows] == [str(Path(f).relative_to(sample_data / "xray")) for f in files]
    probs = np.array([[float(r["prob_NORMAL"]), float(r["prob_PNEUMONIA"])] for r in rows])
    expected = module_probs(module, files, "softmax")
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["prediction"] for r in rows] == [["NORMAL", "PNEUMONIA"][k] for k in expected.argmax(1)]
    assert 0.0 < probs[:, 0].std()  # not a constant output


def test_predict_multilabel_from_a_csv_manifest(sample_data, tmp_path_factory, tmp_path):
    init = tmp_path / "pretrain.ckpt"
    shutil.copy(pretrain_checkpoint(tmp_path_factory), init)
    torch.manual_seed(0)
    dm = LabelledDataModule(train=LabelledSource(str(multilabel_manifest(sample_data, tmp_path)), label_columns=MULTILABELS),
                            task="multilabel", val_fraction=0.3, split_seed=0, image_size=SIZE,
                            batch_size=16, num_workers=0)
    module = MultiLabelModule(num_labels=3, init_checkpoint=str(init), optimizer="sgd", lr=0.05,
                              warmup_steps=1)
    ckpt = fine_tune(module, dm, tmp_path, init)

    listed = [str(p.relative_to(sample_data)) for p in sorted((sample_data / "pathology").rglob("*.png"))[:3]]
    listed += [str(p.relative_to(sample_data)) for p in sorted((sample_data / "xray").rglob("*.png"))[:3]]
    images = tmp_path / "images.csv"
    images.write_text("path,comment\n" + "".join(f"{p},x\n" for p in listed))
    out = tmp_path / "labels.csv"
    assert main(["predict", str(ckpt), "--images", str(images), "--root", str(sample_data),
                 "--out", str(out), "--threshold", "0.5", "--no-progress"]) == 0
    header, rows = read_csv(out)
    assert header == ["path", "prediction", *(f"prob_{n}" for n in MULTILABELS)]
    assert [r["path"] for r in rows] == listed
    probs = np.array([[float(r[f"prob_{n}"]) for n in MULTILABELS] for r in rows])
    expected = module_probs(module, [str(sample_data / p) for p in listed], "sigmoid")
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert [r["prediction"] for r in rows] == [
        ";".join(n for n, p in zip(MULTILABELS, row) if p >= 0.5) for row in expected]


def test_predict_refuses_a_pretraining_checkpoint_and_lightning_predict_is_gone(tmp_path_factory, tmp_path, sample_data):
    with pytest.raises(UsageError, match="pre-training checkpoint .*fine-tune it first"):
        main(["predict", str(pretrain_checkpoint(tmp_path_factory)), "--images",
              str(sample_data / "xray"), "--out", str(tmp_path / "p.csv")])
    assert not (tmp_path / "p.csv").exists()
    from midol.lightning_cli import MidolCLI

    assert set(MidolCLI.subcommands()) == {"fit", "validate", "test"}


def test_predict_rebuilds_dex_routed_experts_without_the_pretraining_file(sample_data, tmp_path):
    from midol.models.dex import DEXLayer
    from tests.helpers.dex import dex_datamodule, tiny_dex

    torch.manual_seed(0)
    dex = tiny_dex()
    quick_trainer(tmp_path / "dex", max_steps=1).fit(dex, dex_datamodule())
    init = tmp_path / "dex.ckpt"
    dex.trainer.save_checkpoint(init)
    dm = LabelledDataModule(train=LabelledSource(str(sample_data / "xray")), val_fraction=0.3,
                            image_size=32, batch_size=8, num_workers=0, split_seed=1)
    module = ClassificationModule(num_classes=2, init_checkpoint=str(init), dex_mode="experts",
                                  lr=1e-2, warmup_steps=1)
    assert any(isinstance(m, DEXLayer) for m in module.backbone.modules())
    ckpt = fine_tune(module, dm, tmp_path, init)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(ckpt), "--images", str(sample_data / "xray" / "NORMAL"),
                 "--out", str(out), "--no-progress"]) == 0
    _, rows = read_csv(out)
    files = scan_images(str(sample_data / "xray" / "NORMAL"))
    probs = np.array([[float(r["prob_NORMAL"]), float(r["prob_PNEUMONIA"])] for r in rows])
    np.testing.assert_allclose(probs, module_probs(module, files, "softmax"), atol=1e-5, rtol=0)
