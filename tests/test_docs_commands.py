"""Every `midol ...` command shown in README.md and docs/*.md still parses (issue 27: 5 of 31
documented commands had rotted). A `fit` / `validate` / `test` command whose config files exist
is parsed for real with --print_config (every option and value checked by LightningCLI, nothing
trained); any other command's options must be options of that command (its --help). Commands
with placeholders (CKPT, `...`) are checked by option name only."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from midol.cli import LIGHTNING_SUBCOMMANDS, TOOLS, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"^(?:OMP_NUM_THREADS=\d+\s+)?(?:\.venv/bin/)?midol\s+(.*)$")


def commands_in(markdown: str) -> list[list[str]]:
    """argv of every `midol` line inside a fenced block of ``markdown`` (continuations joined,
    comments and `&&` chains split off)."""
    found = []
    inside, pending = False, ""
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        text = (pending + " " + line.strip()).strip() if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        text = re.sub(r"\s+#.*$", "", text)
        for part in re.split(r"&&|;", text):
            m = COMMAND.match(part.strip())
            if m:
                try:
                    argv = shlex.split(m.group(1))
                except ValueError:  # prose that starts with "midol" (an apostrophe)
                    continue
                if argv and (argv[0] in TOOLS or argv[0] in LIGHTNING_SUBCOMMANDS):
                    found.append(argv)
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every `midol` line inside a fenced block of the docs."""
    return [(doc.name, argv) for doc in DOCS for argv in commands_in(doc.read_text(encoding="utf-8"))]


COMMANDS = documented_commands()


@cache
def help_text(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def options(argv: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in argv if t.startswith("--") and t != "--"][: None]


def runnable(argv: list[str]) -> bool:
    """A LightningCLI command whose files exist and that names no placeholder."""
    if argv[0] not in LIGHTNING_SUBCOMMANDS or "..." in argv:
        return False
    configs = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--config"]
    paths = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--ckpt_path"]
    return bool(configs) and all((REPO / c).is_file() for c in configs) and not paths


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 25  # the check cannot silently check nothing
    assert {argv[0] for _, argv in COMMANDS} >= {"fit", "test", "eval", "export", "predict", "route"}


@pytest.mark.parametrize("doc,argv", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in COMMANDS])
def test_a_documented_command_parses(doc: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    if runnable(argv) and "--print_config" not in argv and "--help" not in argv:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([*argv, "--print_config"])
        assert exit_.value.code in (0, None), f"{doc}: midol {' '.join(argv)}"
        return
    text = help_text(argv[0])
    own = [o for o in options(argv[1:]) if not o.startswith(("--model.", "--data.", "--trainer."))
           or argv[0] not in LIGHTNING_SUBCOMMANDS]
    def listed(option: str) -> bool:  # a whole option, not the start of a longer one
        return any(re.search(rf"(?<![\w.-]){re.escape(o)}(?![\w.-])", text)
                   for o in (option, option.replace("_", "-")))

    missing = [o for o in own if not listed(o)]
    assert missing == [], f"{doc}: `midol {' '.join(argv)}` uses options {argv[0]} does not have"


@pytest.mark.parametrize("argv", [
    ["eval", "--suite", "configs/eval/sample_data.yaml", "--backbone", "x"],  # --backbones
    ["fit", "--config", "configs/pretrain/demo.yaml", "--model.init_args.num_expertz", "3"],
])
def test_the_check_catches_a_rotted_command(argv: list[str], monkeypatch) -> None:
    with pytest.raises((AssertionError, SystemExit, ValueError)):
        test_a_documented_command_parses("planted", argv, monkeypatch)


# ------------------------------------------- README sections whose every command is run (issue 29)
RELEASED, DEPLOY = "Start from a released model", "Deploy"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_the_run_sections_show_their_commands() -> None:
    assert [a[:3] for a in commands_in(readme_section(RELEASED))] == [
        ["fit", "--config", "configs/continue/continue_swin_base.yaml"],
        ["fit", "--config", "configs/continue/continue_dex_vit_base.yaml"]]
    assert [a[0] for a in commands_in(readme_section(DEPLOY))] == ["export", "embed", "export", "predict"]
    assert len(python_blocks(readme_section(DEPLOY))) == 1


def tiny_medmix_checkpoint(root: Path, path: Path) -> list[dict[str, str]]:
    """A MedMIX trained one epoch on real ODIR patients with tiny random experts, saved at
    ``path``; returns the test patients (input columns only) the README's predict scores."""
    import csv
    import warnings

    import lightning as L

    from tests.helpers.medmix import datamodule, medmix, odir_subset

    root.mkdir(parents=True, exist_ok=True)
    manifest = odir_subset(root, {"train": 24, "val": 8, "test": 8})
    L.seed_everything(0)
    model = medmix(root / "cache")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny validation split: labels without positives
        trainer.fit(model, datamodule=datamodule(manifest))
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    with open(manifest, newline="") as fh:
        keep = ["patient_id", "left_image", "right_image", "age", "sex"]
        return [{k: r[k] for k in keep} for r in csv.DictReader(fh) if r["split"] == "test"]


def test_released_model_and_deploy_sections_run(tmp_path: Path, monkeypatch) -> None:
    """Every command of the two sections, as written, in a fresh folder: the fit commands on a
    tiny stand-in of the released file (at the path the preset names, in its own layout) with
    a tiny-scale config added; the Deploy commands and Python block on what they wrote."""
    import csv
    import json

    from tests.helpers.continue_presets import TINY, tiny_setup
    from tests.helpers.medmix import ODIR

    if not (ODIR / "patients.csv").is_file():
        pytest.skip("ODIR patients not found")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    (tmp_path / "odir_images").symlink_to(ODIR)
    for argv in commands_in(readme_section(RELEASED)):
        preset = Path(argv[2]).stem
        main([argv[0], "--config", str(REPO / argv[2]), *argv[3:], "--config", str(tiny_setup(preset, tmp_path))])
        report = json.loads((tmp_path / "outputs" / preset / "init_report.json").read_text())
        assert report["fraction"] == 1.0 and set(report["reshaped"]) == TINY[preset][3]
        assert (tmp_path / "outputs" / preset / "checkpoints" / "last.ckpt").is_file()
    patients = tiny_medmix_checkpoint(tmp_path / "medmix", tmp_path / "outputs/medmix_odir/checkpoints/best.ckpt")
    with open("new_patients.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(patients[0]))
        writer.writeheader()
        writer.writerows(patients)
    for argv in commands_in(readme_section(DEPLOY)):
        assert main(argv) == 0, argv
    for block in python_blocks(readme_section(DEPLOY)):
        exec(compile(block, "README.md", "exec"), {})  # asserts ONNX == PyTorch itself
    assert {p.name for p in Path("deploy/swin/teacher_backbone_timm").iterdir()} >= {
        "README.md", "config.json", "model.safetensors"}
    import numpy as np

    assert np.load("outputs/embed_oct_swin/embeddings.npy").shape == (16, 128)  # 16 OCT images
    with open("preds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == [p["patient_id"] for p in patients]
    probs = [k for k in rows[0] if k.startswith("prob_")]
    assert probs == [f"prob_{n}" for n in ("N", "D", "G", "C", "A", "H", "M", "O")]  # ODIR's labels
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in probs)
