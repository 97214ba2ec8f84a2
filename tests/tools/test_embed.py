"""`midol embed` (issue 29, item 4): the written embeddings are the backbone's own forward on the
same preprocessed images; a rerun reuses the feature cache and a killed run resumes; an
unreadable image gets ok=false and a NaN row; an earlier run's files are not overwritten without
--overwrite; a CSV manifest carries its modality column."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from midol.cli import main
from midol.data.image_io import load_image
from midol.data.normalize import PixelNormalizer
from midol.data.readers import scan_images
from midol.data.transforms.eval import EvalTransform
from midol.evaluation import features
from tests.helpers.paths import REPO_ROOT, SAMPLE_DATA

SPEC = "random:vit_tiny_patch16_224,img_size=32,patch_size=8,depth=1,embed_dim=48,num_heads=2"
SIZE = 32


def readme_command() -> list[str]:
    """The command of the README's `midol embed` subsection (its first bash block)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Embeddings of a folder or a manifest: `midol embed`"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:2] == ["midol", "embed"]
    return argv[1:]


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def forward(files: list[str], readout: str) -> np.ndarray:
    """The backbone's own numbers: the evaluation crop, the pre-training normalisation, its
    forward (class token: ``model(x)``; ``avg``: mean of the patch tokens)."""
    model = features.load(features.parse_backbone(SPEC)).model.eval()
    x = PixelNormalizer()(torch.stack([EvalTransform(SIZE)(load_image(f)) for f in files]))
    with torch.no_grad():
        if readout == "cls":
            return model(x).numpy()
        tokens = model.forward_features(x)
        return tokens[:, model.num_prefix_tokens:].mean(1).numpy()


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def run(tmp_path: Path, *args: str, out: str = "out") -> dict:
    assert main(["embed", "--backbone", SPEC, "--out", str(tmp_path / out),
                 "--cache_dir", str(tmp_path / "cache"), *args]) == 0
    return json.loads((tmp_path / out / "embed.json").read_text())


def test_readme_command_gives_the_backbones_own_forward(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the README's paths are relative to the repository
    argv = with_option(readme_command(), "--out", str(tmp_path / "cls"))
    argv = with_option(argv, "--cache_dir", str(tmp_path / "cache"))
    assert main(argv) == 0
    files = scan_images(str(SAMPLE_DATA / "oct"))
    out = tmp_path / "cls"
    emb = np.load(out / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (len(files), 48) == (16, 48)
    np.testing.assert_allclose(emb, forward(files, "cls"), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(load_file(str(out / "embeddings.safetensors"))["embeddings"], emb)
    rows = read_manifest(out)
    assert [r["path"] for r in rows] == [str(Path(f).relative_to(SAMPLE_DATA / "oct")) for f in files]
    assert {r["modality"] for r in rows} == {"oct"} and {r["ok"] for r in rows} == {"true"}
    assert [int(r["row"]) for r in rows] == list(range(16))
    meta = json.loads((out / "embed.json").read_text())
    assert (meta["readout"], meta["image_size"], meta["device"], meta["count"], meta["dim"]) == (
        "cls", SIZE, "cpu", 16, 48)
    assert meta["backbone"]["spec"] == SPEC and meta["computed"] == 16 and meta["midol"]

    # the other read-out of the same backbone comes from the same cache entry: nothing embedded
    meta = run(tmp_path, "--images", str(SAMPLE_DATA / "oct"), "--readout", "avg", out="avg")
    assert (meta["computed"], meta["reused"]) == (0, 16)
    np.testing.assert_allclose(np.load(tmp_path / "avg" / "embeddings.npy"), forward(files, "avg"),
                               atol=1e-5, rtol=0)


def test_rerun_reuses_the_cache_and_a_killed_run_resumes(tmp_path, monkeypatch):
    encoder = features._encoder
    calls = []

    def killed_after_one_batch(backbone, device):
        encode = encoder(backbone, device)

        def wrapped(images):
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt  # Ctrl-C / SIGTERM (raised as Terminated) mid-pass
            return encode(images)

        return wrapped

    args = ("--images", str(SAMPLE_DATA / "oct"), "--batch_size", "5")
    monkeypatch.setattr(features, "_encoder", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *args)
    assert not (tmp_path / "out" / "embed.json").exists()
    monkeypatch.setattr(features, "_encoder", encoder)
    meta = run(tmp_path, *args)
    assert (meta["computed"], meta["reused"]) == (11, 5)  # the first batch was kept
    first = np.load(tmp_path / "out" / "embeddings.npy")
    meta = run(tmp_path, *args, "--overwrite")
    assert (meta["computed"], meta["reused"]) == (0, 16)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings.npy"), first)
    np.testing.assert_allclose(first, forward(scan_images(str(SAMPLE_DATA / "oct")), "cls"),
                               atol=1e-5, rtol=0)


def test_a_corrupt_image_gets_ok_false_and_a_nan_row_and_is_warned_once(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = scan_images(str(SAMPLE_DATA / "xray"))[:3]
    for f in good:
        shutil.copy(f, folder / Path(f).name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    meta = run(tmp_path, "--images", str(folder), "--modality", "xray")
    assert (meta["count"], meta["ok"]) == (4, 3)
    rows = read_manifest(tmp_path / "out")
    names = sorted([Path(f).name for f in good] + ["broken.png"])
    assert [r["path"] for r in rows] == names
    assert [r["ok"] for r in rows] == ["false" if n == "broken.png" else "true" for n in names]
    assert {r["modality"] for r in rows} == {"xray"}
    emb = np.load(tmp_path / "out" / "embeddings.npy")
    broken = names.index("broken.png")
    assert np.isnan(emb[broken]).all() and np.isfinite(np.delete(emb, broken, 0)).all()
    np.testing.assert_allclose(np.delete(emb, broken, 0), forward(sorted(good, key=lambda f: Path(f).name), "cls"),
                               atol=1e-5, rtol=0)
    err = capsys.readouterr().err
    assert len(re.findall(r"midol embed: warning: .*broken\.png", err)) == 1, err


def test_existing_outputs_are_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "embeddings.npy").write_bytes(b"an earlier run")
    argv = ["embed", "--backbone", SPEC, "--images", str(SAMPLE_DATA / "oct"), "--out", str(out),
            "--cache_dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(argv, report=True) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"midol: error: --out {out} already holds embeddings.npy: pass --overwrite "
                   "to replace them, or choose another folder"]
    assert (out / "embeddings.npy").read_bytes() == b"an earlier run"
    assert not (tmp_path / "cache").exists()  # refused before any image was embedded
    assert main([*argv, "--overwrite"]) == 0
    assert np.load(out / "embeddings.npy").shape == (16, 48)


def test_manifest_with_a_modality_column(tmp_path):
    oct_files = scan_images(str(SAMPLE_DATA / "oct"))[:2]
    xray_files = scan_images(str(SAMPLE_DATA / "xray"))[:2]
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "kind", "label"])
        for f, kind in [*((f, "oct") for f in oct_files), *((f, "xray") for f in xray_files)]:
            writer.writerow([str(Path(f).relative_to(SAMPLE_DATA)), kind, "x"])
        writer.writerow(["xray/missing.png", "xray", "x"])
    meta = run(tmp_path, "--manifest", str(manifest), "--path_column", "file",
               "--modality_column", "kind", "--root", str(SAMPLE_DATA))
    assert (meta["count"], meta["ok"]) == (5, 4)
    assert meta["input"]["manifest"] == str(manifest) and meta["input"]["modality_column"] == "kind"
    rows = read_manifest(tmp_path / "out")
    assert [r["modality"] for r in rows] == ["oct", "oct", "xray", "xray", "xray"]
    assert [r["path"] for r in rows][-1] == "xray/missing.png"
    assert [r["ok"] for r in rows] == ["true"] * 4 + ["false"]
    emb = np.load(tmp_path / "out" / "embeddings.npy")
    assert np.isnan(emb[4]).all()
    np.testing.assert_allclose(emb[:4], forward(oct_files + xray_files, "cls"), atol=1e-5, rtol=0)

    # a column named "modality" is used without being named
    with open(manifest, "w", newline="") as fh:
        fh.write("path,modality\n" + "".join(f"{f},scan\n" for f in oct_files))
    meta = run(tmp_path, "--manifest", str(manifest), out="out2")
    assert [r["modality"] for r in read_manifest(tmp_path / "out2")] == ["scan", "scan"]
    assert meta["computed"] == 0  # the same images: all from the cache
