"""`midol route`: one CSV row per image with a valid expert index and the teacher's confidence."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from midol.cli import main
from midol.data import EvalTransform, load_image
from midol.methods.loading import load_pretrain_module
from tests.helpers.analysis import tiny_run
from tests.helpers.tiny import SAMPLE_DATA


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("route")) / "checkpoints" / "last.ckpt"


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_route_manifest_gives_one_row_per_image(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(SAMPLE_DATA.parent)
    out = tmp_path / "tags.csv"
    assert main(["route", str(checkpoint), "--manifest", "sample_data/labels.csv", "--out", str(out),
                 "--no-progress"]) == 0
    manifest = read(SAMPLE_DATA / "labels.csv")
    rows = read(out)
    assert len(rows) == len(manifest) == 117
    assert list(rows[0]) == ["path", "expert", "confidence", "modality"]
    module = load_pretrain_module(checkpoint)
    for row, listed in zip(rows, manifest):
        assert row["path"] == str(Path("sample_data") / listed["path"])
        assert row["modality"] == listed["modality"]
        assert 0 <= int(row["expert"]) < module.num_experts == 3
        assert 1 / 3 <= float(row["confidence"]) <= 1.0  # the top-1 of 3 probabilities
    # the tags equal the teacher router applied by hand: top-1 of softmax(g_T / tau_t)
    images = torch.stack([EvalTransform(32)(load_image(r["path"])) for r in rows[:5]])
    logits = module.teacher["projector"].router(module.teacher_features(images))
    probs = (logits / module.hparams.teacher_temp).softmax(dim=-1)
    expected_expert = module.route(images)[1]["projector"].expert
    for i, row in enumerate(rows[:5]):
        assert int(row["expert"]) == int(expected_expert[i]) == int(probs[i].argmax())
        assert float(row["confidence"]) == pytest.approx(float(probs[i].max()), abs=2e-6)
    printed = capsys.readouterr().out
    assert "| total | 60 | 41 | 16 | 117 |" in printed  # xray, pathology, oct (manifest order)
    assert "NMI" in printed and "purity" in printed


def test_route_folder_and_data_config(checkpoint, tmp_path):
    out = tmp_path / "oct.csv"
    assert main(["route", str(checkpoint), "--folder", str(SAMPLE_DATA / "oct"), "--out", str(out),
                 "--no-progress", "--batch-size", "5"]) == 0
    rows = read(out)
    files = sorted(p for p in (SAMPLE_DATA / "oct").rglob("*.png"))
    assert len(rows) == len(files) == 16
    assert list(rows[0]) == ["path", "expert", "confidence"]  # no modality given
    assert sorted(r["path"] for r in rows) == sorted(map(str, files))
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  init_args:\n    transform: {init_args: {global_size: 32}}\n    sources:\n"
        f"      - {{path: {SAMPLE_DATA / 'fundus_retinamnist.npz'}, modality: fundus}}\n"
        f"      - {{path: {SAMPLE_DATA / 'oct'}, modality: oct}}\n"
    )
    out = tmp_path / "data.csv"
    assert main(["route", str(checkpoint), "--data", str(config), "--out", str(out), "--no-progress"]) == 0
    rows = read(out)
    assert len(rows) == 200 + 16
    assert [r["modality"] for r in rows] == ["fundus"] * 200 + ["oct"] * 16
    assert rows[0]["path"].endswith("fundus_retinamnist.npz#train[0]")


def test_route_errors_are_clear(checkpoint, tmp_path):
    with pytest.raises(SystemExit):  # argparse: one input required
        main(["route", str(checkpoint), "--out", str(tmp_path / "x.csv")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["route", str(checkpoint), "--folder", str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv")])
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a midol training checkpoint"):
        main(["route", str(bad), "--folder", str(SAMPLE_DATA / "oct"), "--out", str(tmp_path / "x.csv")])


def test_a_file_name_that_is_not_utf8_is_routed_and_written_as_its_bytes(checkpoint, tmp_path):
    """Issue 26 item 16: a non-UTF-8 file name aborted `midol route`."""
    import os
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted((SAMPLE_DATA / "oct").rglob("*.png"))[0]
    shutil.copy(src, os.path.join(os.fsencode(folder), b"caf\xe9.png"))  # Latin-1, not UTF-8
    shutil.copy(src, folder / "plain.png")
    out = tmp_path / "tags.csv"
    assert main(["route", str(checkpoint), "--folder", str(folder), "--out", str(out), "--no-progress"]) == 0
    raw = out.read_bytes()
    assert b"caf\xe9.png" in raw and b"plain.png" in raw
