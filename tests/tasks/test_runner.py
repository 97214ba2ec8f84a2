"""Experiment runner: mean ± std and t-test against hand computations; a tiny end-to-end
fine-tuning run through Lightning; a frozen-probe task scored by midol eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from experiments import scoring
from experiments.downstream import report
from experiments.downstream import run as runner
from tests.helpers.finetune import REPO, SIZE, pretrain_checkpoint
from tests.helpers.tiny import TINY_SWIN

RESULTS = {
    "A": {0: {"test/acc": 0.80, "test/auc": 0.90}, 1: {"test/acc": 0.82, "test/auc": 0.91}, 2: {"test/acc": 0.84, "test/auc": 0.92}},
    "B": {0: {"test/acc": 0.70, "test/auc": 0.93}, 1: {"test/acc": 0.75, "test/auc": 0.93}, 2: {"test/acc": 0.74, "test/auc": 0.94}},
    "C": {0: {"test/acc": 0.50, "test/auc": 0.50}, 1: {"test/acc": 0.52, "test/auc": 0.51}, 2: {"test/acc": 0.51, "test/auc": 0.52}},
}


def student_t_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Student's pooled-variance t-test with 4 degrees of freedom (n = 3 + 3),
    from the closed form of the t(4) CDF: P(|T| > t) = 1 - t (t^2 + 6) / (t^2 + 4)^(3/2)."""
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a) / (n - 1)
    vb = sum((x - mb) ** 2 for x in b) / (n - 1)
    t = abs(ma - mb) / math.sqrt((va + vb) / 2 * (2 / n))
    return 1 - t * (t * t + 6) / (t * t + 4) ** 1.5


def test_summary_and_t_test_match_hand_computation():
    acc = report.summarize(RESULTS, "test/acc")
    assert acc["A"].mean == pytest.approx(0.82)
    assert acc["A"].std == pytest.approx(0.02)  # sample std of 0.80, 0.82, 0.84
    comparison = report.compare_top_two(acc)
    assert (comparison.best, comparison.second) == ("A", "B")
    a, b = acc["A"].values, acc["B"].values
    assert comparison.p_value == pytest.approx(student_t_p(a, b), rel=1e-6)
    auc = report.compare_top_two(report.summarize(RESULTS, "test/auc"))
    assert (auc.best, auc.second) == ("B", "A")
    assert math.isnan(report.t_test([0.5, 0.5], [0.5, 0.5]))


def test_markdown_table_marks_best_and_lists_p_values_and_skips():
    text = report.markdown_table(RESULTS, ["test/acc", "test/auc"], {"D": "no weights"})
    assert "| A | **82.00 ± 2.00** |" in text
    assert "| B | 73.00 ± 2.65 | **93.33 ± 0.58** |" in text
    p = report.fmt_p(student_t_p(RESULTS_ACC("A"), RESULTS_ACC("B")))
    assert f"p = {p} (A vs B)" in text
    assert "| D | skipped | skipped |" in text and "* D: skipped, no weights" in text


def RESULTS_ACC(name: str) -> list[float]:
    return [RESULTS[name][s]["test/acc"] for s in (0, 1, 2)]


def test_relocate_and_dotted_overrides():
    cfg = {"trainer": {"default_root_dir": "outputs/x", "callbacks": [{"init_args": {"dirpath": "outputs/x/ck"}}],
                       "logger": {"init_args": {"save_dir": "outputs/x"}}}, "data": {"path": "outputs/xy"}}
    out = runner.relocate(cfg, Path("/tmp/run"))
    assert out["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "/tmp/run/ck"
    assert out["trainer"]["logger"]["init_args"]["save_dir"] == "/tmp/run"
    assert out["data"]["path"] == "outputs/xy"  # only paths under the root move
    runner.set_dotted(out, "model.init_args.lr", 0.1)
    assert out["model"]["init_args"]["lr"] == 0.1


def test_runner_end_to_end_fine_tuning_on_real_xrays(sample_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the runner works from the repository root; restored afterwards
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": "outputs/finetune/tiny",
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": "outputs/finetune/tiny/ck", "monitor": "val/auc", "mode": "max"}}]},
        "model": {"class_path": "midol.tasks.ClassificationModule",
                  "init_args": {"num_classes": 2, "backbone": "swin_tiny_patch4_window7_224",
                                "backbone_kwargs": dict(TINY_SWIN), "linear_probe": False}},
        "data": {"class_path": "midol.data.LabelledDataModule",
                 "init_args": {"train": {"path": str(sample_data / "xray")}, "val_fraction": 0.2, "test_fraction": 0.2,
                               "image_size": SIZE, "batch_size": 8, "num_workers": 0}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    spec = {
        "name": "tiny", "workdir": str(tmp_path / "work"), "out": str(tmp_path / "table.md"), "seeds": [0, 1],
        "tasks": {"X-ray": {"config": str(tmp_path / "config.yaml")}},
        "backbones": {"Random A": {}, "Random B": {"model.init_args.head_norm": True},
                      "Missing": {"model.init_args.init_checkpoint": str(tmp_path / "none.ckpt")}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FileNotFoundError, match="none.ckpt"):
        runner.main([str(tmp_path / "spec.yaml")])
    assert runner.main([str(tmp_path / "spec.yaml"), "--allow-missing"]) == 0
    result = json.loads((tmp_path / "work/X-ray/Random_B/seed1/result.json").read_text())
    assert result["monitor"] == "val/auc" and 0 <= result["metrics"]["test/auc"] <= 1
    text = (tmp_path / "table.md").read_text()
    assert "| Random A |" in text and "| Missing | skipped | skipped |" in text and "Device:" in text
    # Finished runs are reused: a second call changes no result file.
    before = result["finished"]
    assert runner.main([str(tmp_path / "spec.yaml"), "--allow-missing"]) == 0
    assert json.loads((tmp_path / "work/X-ray/Random_B/seed1/result.json").read_text())["finished"] == before


def _probe_config(sample_data: Path, **init_args) -> dict:
    return {
        "trainer": {"default_root_dir": "outputs/finetune/probe"},
        "model": {"class_path": "midol.tasks.ClassificationModule",
                  "init_args": {"num_classes": 2, "linear_probe": True, "head_norm": True, **init_args}},
        "data": {"class_path": "midol.data.LabelledDataModule",
                 "init_args": {"train": {"path": str(sample_data / "xray")}, "val_fraction": 0.2,
                               "test_fraction": 0.3, "split_seed": 0, "image_size": SIZE}},
    }


def test_frozen_probe_task_is_scored_by_midol_eval(sample_data, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(REPO)
    ckpt = pretrain_checkpoint(tmp_path_factory)
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(_probe_config(sample_data)))
    spec = {
        "name": "tiny-probe", "workdir": str(tmp_path / "work"), "out": str(tmp_path / "table.md"),
        "seeds": [0, 1], "probe": {"protocols": "knn,linear", "bootstrap": 200},
        "tasks": {"X-ray probe": {"config": str(tmp_path / "probe.yaml")}},
        "backbones": {
            "Pretrained": {"model.init_args.init_checkpoint": str(ckpt)},
            "Pretrained student": {"model.init_args.init_checkpoint": str(ckpt),
                                   "model.init_args.init_prefix": "student.backbone."},
            "Random init": {"model.init_args.init_checkpoint": None,
                            "model.init_args.backbone": "swin_tiny_patch4_window7_224",
                            "model.init_args.backbone_kwargs": dict(TINY_SWIN)},
            "Missing": {"model.init_args.init_checkpoint": str(tmp_path / "none.ckpt")},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert runner.main([str(tmp_path / "spec.yaml"), "--allow-missing"]) == 0
    report = json.loads((tmp_path / "work/X-ray_probe/midol_eval/report.json").read_text())
    specs = {b["label"]: b["spec"] for b in report["provenance"]["backbones"]}
    assert specs == {"Pretrained": str(ckpt), "Pretrained student": f"{ckpt}:student_backbone",
                     "Random init": "random:swin_tiny_patch4_window7_224,depths=[1, 1, 1, 1],"
                                    "embed_dim=16,img_size=32,num_heads=[1, 2, 2, 4],window_size=2"}
    # the named random init is the reference of the Swin: no second one is added
    assert [r["key"] for r in report["rows"] if r["reference"]] == ["Random init"]
    # the config's carving (val 0.2, test 0.3, split_seed 0) is the suite's: 60 x-rays
    assert report["tasks"]["X-ray probe"]["sizes"] == {"train": 30, "val": 12, "test": 18}
    auc = scoring.digest(report, "auc")
    text = (tmp_path / "table.md").read_text()
    for row in ("Pretrained", "Pretrained student"):
        linear = scoring.cell(auc, row, "X-ray probe")
        assert linear["lo"] <= linear["mean"] <= linear["hi"]
        assert f"| {row} | " in text and scoring.ci_cell(linear) in text
        assert scoring.verdict_cell(scoring.versus(auc, row, "X-ray probe")) in text
    assert "| Random init (reference) |" in text and "| Missing | skipped |" in text
    assert "scored by midol eval" in text and not (tmp_path / "work/X-ray_probe/Pretrained").exists()


def test_backbone_specs_from_downstream_overrides(tmp_path):
    def spec(**init):
        return runner.backbone_spec({"model": {"init_args": init}})

    ckpt = str(tmp_path / "run.ckpt")
    assert spec(init_checkpoint=ckpt) == ckpt
    assert spec(init_checkpoint=ckpt, init_part="student_backbone") == f"{ckpt}:student_backbone"
    assert spec(init_checkpoint=ckpt, dex_mode="experts") == f"{ckpt}:experts_backbone"
    assert spec(backbone="resnet18", backbone_kwargs={"in_chans": 3}) == "random:resnet18,in_chans=3"
    assert spec(backbone="resnet18", init_checkpoint="w.pth", init_format="timm") == "timm:resnet18@w.pth"
    with pytest.raises(ValueError, match="drop backbone_kwargs"):
        spec(init_checkpoint=ckpt, backbone_kwargs={"drop_path_rate": 0.1})
    with pytest.raises(ValueError, match="contradicts"):
        spec(init_checkpoint=ckpt, init_part="teacher_backbone", dex_mode="director")
