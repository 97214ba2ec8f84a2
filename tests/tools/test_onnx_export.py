"""`midol export --onnx` (issue 29, item 2): every exported backbone (M-IDoL teacher, DEX
director and routed experts) and a fine-tuned task model as ONNX with a dynamic batch axis,
equal to PyTorch on real images to 1e-4 at batch sizes 1 and 3; the parity measured at export is
recorded in the part's JSON, and a mismatch is a one-line error that leaves no .onnx behind."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from midol.cli import main
from midol.data import LabelledDataModule, LabelledSource
from midol.errors import EXIT_INPUT, EXIT_USAGE
from midol.tasks import ClassificationModule
from midol.tasks.backbones import load_backbone
from tests.helpers.dex import dex_datamodule, tiny_dex
from tests.helpers.finetune import SIZE, pretrain_checkpoint, quick_trainer, tiny_backbone_args
from tests.helpers.images import real_batch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOL = 1e-4


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixels": x.numpy()})[0])


def normalized(size: int, meta: dict) -> torch.Tensor:
    """The real sample images as the JSON describes the input: [0, 1], then (x - mean) / std."""
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (real_batch(size).float() / 255 - mean) / std


def assert_equal_to_pytorch(onnx_path: Path, model: torch.nn.Module, x: torch.Tensor) -> None:
    """ONNX = PyTorch at batch sizes 1 (every image alone) and 3 (the first six images)."""
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    for i in range(len(x)):
        np.testing.assert_allclose(run_onnx(onnx_path, x[i:i + 1]), expected[i:i + 1], rtol=0, atol=TOL)
    for i in (0, 3):
        np.testing.assert_allclose(run_onnx(onnx_path, x[i:i + 3]), expected[i:i + 3], rtol=0, atol=TOL)


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("midol: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def dex_checkpoint(tmp_path_factory) -> Path:
    """A tiny DEX after 2 optimiser steps on real sample images."""
    root = tmp_path_factory.mktemp("dex")
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(tiny_dex(), dex_datamodule())
    trainer.save_checkpoint(root / "dex.ckpt")
    return root / "dex.ckpt"


def test_midol_teacher_onnx_equals_the_pytorch_backbone_and_records_parity(tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path), "--onnx"]) == 0
    meta = json.loads((tmp_path / "teacher_backbone.json").read_text())
    onnx_meta = meta["onnx"]
    # the tiny Swin (one block per stage, no shifted window) also holds at twice its size
    assert onnx_meta["file"] == "teacher_backbone.onnx" and onnx_meta["opset"] >= 17
    assert onnx_meta["sizes"] == [32, 64] and onnx_meta["batch_sizes"] == [1, 3]
    assert onnx_meta["dynamic_axes"] == ["batch", "height", "width"]
    assert onnx_meta["single_size_reason"] is None
    assert 0 <= onnx_meta["max_abs_diff"] <= TOL == onnx_meta["tolerance"]
    assert onnx_meta["input"] == "pixels" and onnx_meta["output"] == "features"

    import onnx

    graph = onnx.load(str(tmp_path / "teacher_backbone.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch

    backbone, _ = load_backbone(checkpoint=tmp_path / "teacher_backbone.safetensors")
    assert_equal_to_pytorch(tmp_path / "teacher_backbone.onnx", backbone, normalized(32, meta))
    x64 = normalized(64, meta)[:3]
    with torch.no_grad():
        expected = backbone.eval()(x64).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "teacher_backbone.onnx", x64), expected, rtol=0, atol=TOL)


def test_dex_director_and_routed_experts_onnx_equal_pytorch(dex_checkpoint, tmp_path):
    assert main(["export", str(dex_checkpoint), "--out", str(tmp_path), "--onnx",
                 "--parts", "director_backbone", "experts_backbone"]) == 0
    for part in ("director_backbone", "experts_backbone"):
        meta = json.loads((tmp_path / f"{part}.json").read_text())
        onnx_meta = meta["onnx"]
        assert onnx_meta["file"] == f"{part}.onnx" and 0 <= onnx_meta["max_abs_diff"] <= TOL
        # a ViT with a fixed position table runs at its own size only, and the JSON says so
        assert onnx_meta["sizes"] == [32] and onnx_meta["dynamic_axes"] == ["batch"]
        assert "does not run at 64 px" in onnx_meta["single_size_reason"]
        backbone, info = load_backbone(checkpoint=tmp_path / f"{part}.safetensors")
        assert (info.dex is not None) == (part == "experts_backbone")
        # image by image (batch 1): each image routes to its own 2 of the 4 experts, so a graph
        # that froze the example's routing would differ here
        assert_equal_to_pytorch(tmp_path / f"{part}.onnx", backbone, normalized(32, meta))


def test_planted_mismatch_is_a_one_line_error_and_no_file(tmp_path_factory, tmp_path, monkeypatch, capsys):
    class Drifting(ort.InferenceSession):
        def run(self, *args, **kwargs):
            return [out + 1e-3 for out in super().run(*args, **kwargs)]

    monkeypatch.setattr(ort, "InferenceSession", Drifting)
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path), "--onnx"], report=True) == EXIT_INPUT
    line = error_line(capsys)
    assert line.startswith("midol: error: ONNX export of teacher_backbone: max |ONNX - PyTorch| = 0.001")
    assert "> 0.0001 at batch 1, 32 px; no .onnx written" in line
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".*.tmp"))
    assert "onnx" not in json.loads((tmp_path / "teacher_backbone.json").read_text())


def test_a_graph_that_fails_at_the_second_size_is_exported_for_one_size(tmp_path_factory, tmp_path,
                                                                        monkeypatch, capsys):
    class DriftsAt64(ort.InferenceSession):
        def run(self, output_names, feeds, *args, **kwargs):
            outs = super().run(output_names, feeds, *args, **kwargs)
            return [o + 1.0 for o in outs] if feeds["pixels"].shape[-1] == 64 else outs

    monkeypatch.setattr(ort, "InferenceSession", DriftsAt64)
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path), "--onnx"]) == 0
    onnx_meta = json.loads((tmp_path / "teacher_backbone.json").read_text())["onnx"]
    assert onnx_meta["sizes"] == [32] and onnx_meta["dynamic_axes"] == ["batch"]
    assert onnx_meta["single_size_reason"].startswith(
        "32 px only: the graph traced with free height and width does not hold at 64 px: "
        "max |ONNX - PyTorch| = 1 > 0.0001 at batch 1, 64 px")
    assert "32 px only" in capsys.readouterr().out
    import onnx

    dims = onnx.load(str(tmp_path / "teacher_backbone.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 32, 32]


def test_missing_onnxruntime_names_the_extra(tmp_path_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import raises ImportError
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path), "--onnx"], report=True) == EXIT_USAGE
    line = error_line(capsys)
    assert "onnxruntime is not installed" in line and "pip install 'midol[onnx]'" in line
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_fine_tuned_classifier_exports_backbone_and_head(sample_data, tmp_path, capsys):
    torch.manual_seed(0)
    dm = LabelledDataModule(train=LabelledSource(str(sample_data / "xray")), val_fraction=0.3,
                            image_size=SIZE, batch_size=8, num_workers=0, split_seed=1)
    module = ClassificationModule(num_classes=2, lr=1e-2, warmup_steps=1, **tiny_backbone_args())
    quick_trainer(tmp_path, max_steps=2).fit(module, dm)
    ckpt = tmp_path / "finetuned.ckpt"
    module.trainer.save_checkpoint(ckpt)

    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out)], report=True) == EXIT_USAGE
    assert "pass --onnx" in error_line(capsys)
    assert main(["export", str(ckpt), "--out", str(out), "--onnx"]) == 0
    meta = json.loads((out / "task_model.json").read_text())
    assert meta["output_names"] == ["NORMAL", "PNEUMONIA"] and meta["prediction"] == "softmax"
    assert meta["image_size"] == SIZE and meta["onnx"]["output"] == "logits"
    assert 0 <= meta["onnx"]["max_abs_diff"] <= TOL and meta["onnx"]["batch_sizes"] == [1, 3]

    module.eval()
    x = normalized(SIZE, meta)

    class Logits(torch.nn.Module):
        def forward(self, x):
            return module.forward_normalized(x)

    assert_equal_to_pytorch(out / "task_model.onnx", Logits(), x)
    # the probabilities `midol predict` gives: the module's own forward on uint8 images
    with torch.no_grad():
        probs = module(real_batch(SIZE)).softmax(-1).numpy()
    logits = run_onnx(out / "task_model.onnx", x)
    np.testing.assert_allclose(torch.from_numpy(logits).softmax(-1).numpy(), probs, atol=1e-5)
