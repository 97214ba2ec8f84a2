"""`midol route` / `analyze` / `export` on the wrong or a broken checkpoint, an unwritable
``--out``, and an interrupted route: one ``midol: error:`` line, the documented exit code,
and the rows routed so far kept on disk."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from midol.cli import main
from midol.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_USAGE
from midol.tools import cmd_route
from tests.helpers.faults import flip_a_bit
from tests.helpers.tiny import SAMPLE_DATA, tiny_module

OCT = str(SAMPLE_DATA / "oct")  # 16 real OCT images


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny M-IDoL (3 experts), its DINO baseline (use_moe: false), an empty and a truncated copy."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    moe = _save(tiny_module(), root / "moe.ckpt")
    dino = _save(tiny_module(use_moe=False, route_weight=0.0, cst_loss="dino_ce"), root / "dino.ckpt")
    (root / "empty.ckpt").write_bytes(b"")
    data = moe.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return {"moe": moe, "dino": dino, "empty": root / "empty.ckpt",
            "truncated": root / "truncated.ckpt"}


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args, report=True)
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("midol: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", ["empty", "truncated"])
@pytest.mark.parametrize("tool", ["route", "analyze", "export"])
def test_empty_or_truncated_checkpoint_is_named(checkpoints, tmp_path, capsys, tool, kind):
    ckpt = checkpoints[kind]
    rest = {"route": ["--folder", OCT, "--out", str(tmp_path / "tags.csv"), "--no-progress"],
            "analyze": ["--data", str(tmp_path / "unused.yaml"), "--out", str(tmp_path / "an"),
                        "--no-progress"],
            "export": ["--out", str(tmp_path / "export")]}[tool]
    code, err = _run([tool, str(ckpt), *rest], capsys)
    assert code == EXIT_INPUT == 3
    line = _error_line(err)
    assert line.startswith(f"midol: error: {ckpt} is empty or truncated (not a readable checkpoint)")
    assert ("0 bytes" if kind == "empty" else "the end of the file is missing") in line
    assert "Traceback" not in err


@pytest.mark.parametrize("tool", ["route", "export"])
def test_bit_flipped_checkpoint_is_named_not_loaded(checkpoints, tmp_path, capsys, tool):
    """load_method checks the zip CRCs: a flipped bit in the tensor data used to load silently."""
    ckpt = tmp_path / "flipped.ckpt"
    ckpt.write_bytes(checkpoints["moe"].read_bytes())
    member = flip_a_bit(ckpt)
    rest = {"route": ["--folder", OCT, "--out", str(tmp_path / "tags.csv"), "--no-progress"],
            "export": ["--out", str(tmp_path / "export")]}[tool]
    code, err = _run([tool, str(ckpt), *rest], capsys)
    assert code == EXIT_INPUT == 3
    assert _error_line(err) == (
        f"midol: error: {ckpt}: the checkpoint file is truncated or damaged "
        f"({ckpt.stat().st_size} bytes; member {member} fails its CRC-32 check: it changed after "
        "it was written, e.g. a bit flip or a bad copy)")
    assert not (tmp_path / "export").exists()


@pytest.mark.filterwarnings("ignore:exporting an untrained model")
def test_route_on_an_exported_backbone_says_it_needs_the_training_checkpoint(checkpoints, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", str(checkpoints["moe"]), "--out", str(export)]) == 0
    backbone = export / "teacher_backbone.safetensors"
    assert backbone.is_file()
    capsys.readouterr()
    code, err = _run(["route", str(backbone), "--folder", OCT, "--out", str(tmp_path / "t.csv")], capsys)
    assert code == EXIT_USAGE == 2
    assert _error_line(err) == (
        f"midol: error: {backbone}: an exported backbone (.safetensors) holds the backbone "
        "weights only, not the router that picks an image's expert (midol export leaves the "
        "projection heads out); midol route needs the training checkpoint it came from (.ckpt, "
        "e.g. <run>/checkpoints/last.ckpt)")
    assert "Traceback" not in err and not (tmp_path / "t.csv").exists()
    # analyze (which also needs the heads) names the file kind too
    code, err = _run(["analyze", str(backbone), "--data", "x.yaml", "--out", str(tmp_path / "an")], capsys)
    assert code == EXIT_USAGE
    assert f"{backbone} is an exported backbone (.safetensors" in _error_line(err)


def test_route_on_a_model_without_router_exits_with_the_usage_code(checkpoints, tmp_path, capsys):
    out = tmp_path / "tags.csv"
    code, err = _run(["route", str(checkpoints["dino"]), "--folder", OCT, "--out", str(out),
                      "--modality", "oct", "--no-progress"], capsys)
    assert code == EXIT_USAGE
    line = _error_line(err)
    assert line.startswith(f"midol: error: {checkpoints['dino']}: this model has no router")
    assert "use_moe: false" in line and "NMI" not in err + capsys.readouterr().out
    assert not out.exists()


def test_unwritable_out_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "tags.csv"
    # the checkpoint does not even exist: --out is checked first
    code, err = _run(["route", str(tmp_path / "missing.ckpt"), "--folder", OCT, "--out", str(out)], capsys)
    assert code == EXIT_INPUT
    assert _error_line(err) == f"midol: error: --out {out}: {blocker} is a file, not a folder"
    code, err = _run(["route", str(tmp_path / "missing.ckpt"), "--folder", OCT, "--out", str(tmp_path)], capsys)
    assert code == EXIT_INPUT
    assert _error_line(err) == f"midol: error: --out {tmp_path}: is a folder; give the path of a CSV file"


def test_interrupted_route_keeps_the_rows_written_so_far(checkpoints, tmp_path, capsys, monkeypatch):
    real_collect = cmd_route.collect
    calls = []

    def collect_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(cmd_route, "collect", collect_then_interrupt)
    out = tmp_path / "tags.csv"
    code, err = _run(["route", str(checkpoints["moe"]), "--folder", OCT, "--out", str(out),
                      "--modality", "oct", "--batch-size", "5", "--no-progress"], capsys)
    assert code == EXIT_INTERRUPTED == 130
    assert err.splitlines()[-1] == "midol: interrupted"
    partial = tmp_path / "tags.csv.partial"
    assert (f"midol route: stopped after 10 image(s); their rows are in {partial} (incomplete; "
            f"{out} is not written)") in err
    assert not out.exists()
    with open(partial, newline="") as fh:
        rows = list(csv.DictReader(fh))
    files = sorted(str(p) for p in Path(OCT).rglob("*.png"))
    assert [r["path"] for r in rows] == files[:10]  # two batches of 5, in corpus order
    assert all(0 <= int(r["expert"]) < 3 and r["modality"] == "oct" for r in rows)


def test_full_route_still_writes_every_row(checkpoints, tmp_path, capsys):
    out = tmp_path / "tags.csv"
    assert main(["route", str(checkpoints["moe"]), "--folder", OCT, "--out", str(out),
                 "--batch-size", "6", "--no-progress"], report=True) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and list(rows[0]) == ["path", "expert", "confidence"]
    assert f"wrote 16 rows to {out} (3 experts, 32 px)" in capsys.readouterr().out


def _interrupt_at_third_batch(monkeypatch) -> None:
    real_collect = cmd_route.collect
    calls = []

    def collect_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(cmd_route, "collect", collect_then_interrupt)


def test_interrupted_rerun_keeps_the_previous_csv(checkpoints, tmp_path, capsys, monkeypatch):
    """A rerun writes <out>.partial and replaces <out> only when complete: the previous CSV
    survives an interrupted rerun whole (it used to be truncated at the start)."""
    out = tmp_path / "tags.csv"
    args = ["route", str(checkpoints["moe"]), "--folder", OCT, "--out", str(out),
            "--batch-size", "5", "--no-progress"]
    assert _run(args, capsys)[0] == 0
    before = out.read_bytes()
    assert len(before.splitlines()) == 17
    _interrupt_at_third_batch(monkeypatch)
    code, err = _run(args, capsys)
    assert code == EXIT_INTERRUPTED
    assert out.read_bytes() == before
    partial = tmp_path / "tags.csv.partial"
    assert f"their rows are in {partial} (incomplete; {out} is unchanged)" in err
    assert len(partial.read_text().splitlines()) == 11  # header and two batches of 5
    monkeypatch.undo()
    assert _run(args, capsys)[0] == 0  # a complete rerun replaces both
    assert not partial.exists() and out.read_bytes() == before


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_during_route_prints_the_incomplete_note_and_keeps_the_csv(checkpoints, tmp_path):
    """SIGTERM (a kill, a scheduler) ends the route like Ctrl-C: the note, exit 143, the
    previous CSV untouched (it used to die silently, leaving a truncated CSV)."""
    out = tmp_path / "tags.csv"
    out.write_text("path,expert,confidence\nold.png,1,0.5\n")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from midol.cli import main
        from midol.tools import cmd_route
        real, calls = cmd_route.collect, []
        def collect(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        cmd_route.collect = collect
        sys.exit(main(["route", {str(checkpoints["moe"])!r}, "--folder", {OCT!r}, "--out",
                       {str(out)!r}, "--batch-size", "5", "--no-progress"], report=True))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 143, proc.stderr
    partial = tmp_path / "tags.csv.partial"
    assert (f"midol route: stopped after 10 image(s); their rows are in {partial} (incomplete; "
            f"{out} is unchanged)") in proc.stderr
    assert out.read_text() == "path,expert,confidence\nold.png,1,0.5\n"
