"""``midol eval`` end to end on the bundled real sample images: a tiny M-IDoL checkpoint and a
micro ViT, a two-task suite, the report files, the feature cache reuse, paired verdicts and
the bad inputs of the issue (each one line, nothing half-written)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from midol.cli import main
from midol.evaluation.features import BackboneError, parse_backbone
from midol.evaluation.suite import SuiteError, load_suite, load_task
from tests.helpers.eval_suites import FAST, two_task_suite
from tests.helpers.tiny import SAMPLE_DATA, save_trained_checkpoint, tiny_module

MICRO_VIT = "random:vit_tiny_patch16_224,img_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_trained_checkpoint(tiny_module(), tmp_path_factory.mktemp("ckpt") / "midol.ckpt")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_whole_command_report_cache_and_paired_verdicts(checkpoint, tmp_path):
    suite, out, cache = two_task_suite(tmp_path), tmp_path / "out", tmp_path / "cache"
    args = ["eval", "--suite", str(suite), "--out", str(out), "--cache_dir", str(cache), *FAST]
    assert main([*args, "--backbones", f"m={checkpoint}", f"v={MICRO_VIT}", "--baseline", "v"]) == 0
    for name in ("report.md", "report.json", "runs.csv", "label_efficiency_shots.png",
                 "label_efficiency_fractions.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    labels = [b["label"] for b in report["provenance"]["backbones"]]
    # the random init of the checkpoint's Swin was added by itself; the micro ViT is random
    assert labels == ["m", "v", "random:swin_tiny_patch4_window7_224"]
    assert report["provenance"]["backbones"][0]["sha256"][str(checkpoint)] == \
        __import__("hashlib").sha256(checkpoint.read_bytes()).hexdigest()
    rows = {r["key"] for r in report["rows"]}
    assert rows == {"m", "v [cls]", "v [avg]", "random:swin_tiny_patch4_window7_224"}
    runs = _rows(out / "runs.csv")
    # 2 tasks x 4 rows x (knn k=10, k=20, linear: 1 draw each; shots 1, 5 and fraction 0.2:
    # 2 draws each) x metrics (binary and ordinal: 7 each)
    assert len(runs) == 2 * 4 * (3 + 3 * 2) * 7
    # same draws for every backbone: identical training sizes per (task, setting, seed)
    sizes: dict[tuple[str, str, str], set[str]] = {}
    for r in runs:
        sizes.setdefault((r["task"], r["setting"], r["seed"]), set()).add(r["train_size"])
    assert all(len(v) == 1 for v in sizes.values())
    kinds = {(c["row"], c["kind"]) for c in report["comparisons"]}
    assert ("m", "random init") in kinds and ("m", "baseline") in kinds
    assert ("v [cls]", "random init") not in kinds  # a random init is its own reference
    text = (out / "report.md").read_text()
    assert "Suite-level verdicts" in text and "vs v" in text and "read out differently" not in text
    computed = report["provenance"]["features"]["computed"]
    assert computed == 3 * (60 + 200)  # every image once per backbone

    # one more backbone: only that backbone is embedded, the rest comes from the cache
    out2 = tmp_path / "out2"
    same = MICRO_VIT  # a second label on identical weights: paired difference exactly 0
    assert main([*args[:4], str(out2), *args[5:], "--backbones", f"m={checkpoint}", f"v={MICRO_VIT}",
                 f"w={same}", "--baseline", "v"]) == 0
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["provenance"]["features"]["computed"] == 0  # w's features = v's cache entry
    assert report2["provenance"]["features"]["reused"] == 4 * 260
    twins = [c for c in report2["comparisons"] if c["row"].startswith("w ") and c["kind"] == "baseline"]
    assert twins and all(c["diff"] == 0.0 and c["verdict"] == "not distinguishable" for c in twins)


def test_too_few_examples_skips_that_k_with_a_warning(tmp_path, capsys):
    suite = two_task_suite(tmp_path)
    assert main(["eval", "--suite", str(suite), "--backbones", MICRO_VIT, "--out",
                 str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), "--seeds", "1",
                 "--bootstrap", "100", "--shots", "25", "--fractions", "1.0",
                 "--protocols", "fewshot", "--tasks", "xray"]) == 0
    assert "midol eval: warning: task 'xray': shots=25 skipped" in capsys.readouterr().err
    text = (tmp_path / "o" / "report.md").read_text()
    assert "shots=25 skipped" in text


def _error(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args, report=True)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path, capsys):
    suite, out = two_task_suite(tmp_path), tmp_path / "out"
    base = ["eval", "--suite", str(suite), "--out", str(out), "--cache_dir", str(tmp_path / "c")]
    code, line = _error(capsys, [*base, "--backbones", str(tmp_path / "missing.ckpt")])
    assert code == 3 and "missing.ckpt does not exist" in line and line.startswith("midol: error:")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    code, line = _error(capsys, [*base, "--backbones", str(broken)])
    assert code == 3 and "broken.ckpt" in line
    code, line = _error(capsys, [*base, "--backbones", MICRO_VIT, "--protocols", "knn,svm"])
    assert code == 2 and "svm" in line
    code, line = _error(capsys, [*base, "--backbones", MICRO_VIT, "--baseline", "nope"])
    assert code == 2 and "--baseline 'nope'" in line
    assert not out.exists()  # nothing written by any failed run

    bad = tmp_path / "bad"
    bad.mkdir()
    bad_type = two_task_suite(bad, {"name": "t", "type": "regression", "train": {"path": "xray"}, "test_fraction": 0.3})
    with pytest.raises(SuiteError, match=r"task 't': unknown task type 'regression'"):
        load_suite(bad_type)
    empty = tmp_path / "empty"
    empty.mkdir()
    (SAMPLE_DATA / "xray")  # a real folder; a test split of 0 images is refused by name
    spec = load_suite(two_task_suite(empty, {"name": "e", "type": "binary", "train": {"path": "xray"},
                                     "test_fraction": 0.001})).tasks[-1]
    with pytest.raises(SuiteError, match=r"task 'e': the test split is empty"):
        load_task(spec, str(SAMPLE_DATA))
    with pytest.raises(BackboneError, match=r"not a midol checkpoint"):
        parse_backbone(str(suite))


def test_image_size_mismatch_warns_and_uses_the_backbones(tmp_path, capsys):
    suite = two_task_suite(tmp_path)
    raw = yaml.safe_load(suite.read_text())
    raw["tasks"][0]["image_size"] = 48
    suite.write_text(yaml.safe_dump(raw))
    assert main(["eval", "--suite", str(suite), "--backbones", f"v={MICRO_VIT}", "--out",
                 str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), "--protocols", "knn",
                 "--bootstrap", "100", "--tasks", "xray"]) == 0
    assert ("midol eval: warning: task 'xray': image_size 48 differs from backbone 'v''s 32; "
            "the backbone's size is used") in capsys.readouterr().err


def test_wandb_tables_when_a_project_is_given(tmp_path, monkeypatch):
    """--wandb_project logs runs.csv and the comparisons as W&B tables (a stand-in wandb module
    records the calls: nothing leaves the machine)."""
    import sys
    import types

    logged: dict = {}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Run:
        def log(self, values):
            logged.update(values)

        def finish(self):
            logged["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: logged.setdefault("init", kw) and Run() or Run(),
                                 Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    suite = two_task_suite(tmp_path)
    assert main(["eval", "--suite", str(suite), "--backbones", f"v={MICRO_VIT}", "--out",
                 str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), "--protocols", "knn",
                 "--bootstrap", "100", "--tasks", "xray", "--wandb_project", "p"]) == 0
    assert logged["init"]["project"] == "p" and logged["finished"]
    runs = _rows(tmp_path / "o" / "runs.csv")
    assert len(logged["eval/runs"].data) == len(runs) == 2 * 2 * 7  # k=10, 20 x cls/avg x 7
    assert "verdict" in logged["eval/comparisons"].columns


def test_every_spelling_of_one_backbone_gives_the_same_features(checkpoint, tmp_path):
    """The checkpoint, its export (file and folder) and timm's local format are one backbone:
    identical features from each spelling."""
    import numpy as np

    from midol.evaluation.features import Embedder, load
    from midol.evaluation.suite import load_suite, load_task

    export = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(export)]) == 0
    suite = load_suite(two_task_suite(tmp_path), only=["xray"])
    split = load_task(suite.tasks[0], suite.data_root).splits["test"]
    spellings = [str(checkpoint), f"{checkpoint}:teacher", str(export / "teacher_backbone.safetensors"),
                 str(export), f"local-dir:{export / 'teacher_backbone_timm'}"]
    feats = []
    for text in spellings:
        backbone = load(parse_backbone(text))
        assert backbone.readouts == ["pool"] and backbone.image_size == 32
        feats.append(Embedder(str(tmp_path / "cache" / str(len(feats)))).embed(backbone, split, 32, text)["pool"])
    for other in feats[1:]:
        np.testing.assert_allclose(other, feats[0], rtol=0, atol=1e-5)
    with pytest.raises(BackboneError, match="exactly one exported part"):
        parse_backbone(f"{export}:student_backbone")


def test_unwritable_cache_or_out_stops_before_any_image_is_embedded(tmp_path, capsys):
    blocker = tmp_path / "a_file"  # a path through a file: cannot be created, even by root
    blocker.write_text("x")
    for option in ("--cache_dir", "--out"):
        args = {"--cache_dir": str(tmp_path / "c"), "--out": str(tmp_path / "o")}
        args[option] = str(blocker / "x")
        code, line = _error(capsys, ["eval", "--suite", str(two_task_suite(tmp_path)), "--backbones",
                                     MICRO_VIT, *[v for kv in args.items() for v in kv]])
        assert code == 3 and f"({option})" in line and "cannot be created" in line, line
        assert not (tmp_path / "c").exists()  # nothing embedded


def test_print_config_round_trips_through_config(tmp_path, capsys):
    """`--print_config` writes every option; `--config` reads them back, the command line wins."""
    suite = two_task_suite(tmp_path)
    base = ["eval", "--suite", str(suite), "--backbones", f"v={MICRO_VIT}", "--out", str(tmp_path / "o"),
            "--cache_dir", str(tmp_path / "c"), "--protocols", "knn", "--bootstrap", "100"]
    with pytest.raises(SystemExit):
        main([*base, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["protocols"] == "knn" and printed["seeds"] == 5 and printed["knn_temperature"] == 0.07
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert main(["eval", "--config", str(config), "--tasks", "xray", "--knn_k", "5"]) == 0
    runs = _rows(tmp_path / "o" / "runs.csv")
    assert {r["setting"] for r in runs} == {"k=5"} and {r["task"] for r in runs} == {"xray"}
