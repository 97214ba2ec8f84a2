"""User-facing errors of the ``midol`` command (midol/errors.py): one ``midol: error: ...`` line
on stderr naming the file or option, an exit code per kind of error, the traceback only for
unexpected errors or with ``--debug`` / ``MIDOL_DEBUG=1``; and the unreadable-image streaks
that used to pass the setup check and crash mid-epoch."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from midol import cli
from midol.data import DataSource, MultiCropTransform, PretrainDataModule
from midol.data.corpus import Corpus
from midol.data.image_io import UnreadableImageError
from midol.data.pretrain_datasets import READ_CHECK_MAX, PretrainDataset, check_readable
from midol.errors import (
    EXIT_BUG,
    EXIT_DIVERGED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CheckpointFileError,
    UnreadableStreakError,
    UsageError,
    exit_code,
    format_error,
)
from tests.helpers.faults import tiny_config

# ---------------------------------------------------------------- a fake tool: `midol boom KIND`
_RAISES = {
    "usage": lambda: ValueError("--threads must be >= 1"),
    "missing": lambda: FileNotFoundError("data config not found: /nowhere/data.yaml"),
    "diverged": lambda: FloatingPointError("non-finite loss l_cst at global step 7"),
    "interrupt": lambda: KeyboardInterrupt(),
    "bug": lambda: RuntimeError("index 3 is out of bounds"),
}


def main(argv: list[str]) -> int:  # the fake tool's entry point (cli.TOOLS["boom"])
    if argv[0] == "lightning-ctrl-c":  # Lightning's fit: sys.exit(1) after a KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    raise _RAISES[argv[0]]()


@pytest.fixture
def boom(monkeypatch):
    monkeypatch.setitem(cli.TOOLS, "boom", __name__)
    monkeypatch.delenv("MIDOL_DEBUG", raising=False)


@pytest.mark.parametrize(("kind", "code", "line"), [
    ("usage", 2, "midol: error: --threads must be >= 1"),
    ("missing", 3, "midol: error: data config not found: /nowhere/data.yaml"),
    ("diverged", 4, "midol: error: non-finite loss l_cst at global step 7"),
    ("interrupt", 130, "midol: interrupted"),
    ("lightning-ctrl-c", 130, "midol: interrupted"),
])
def test_user_errors_are_one_line_with_their_exit_code(boom, capsys, kind, code, line):
    assert cli.main(["boom", kind], report=True) == code
    captured = capsys.readouterr()
    assert captured.err == line + "\n"  # nothing else: no traceback
    assert captured.out == ""


def test_unexpected_errors_keep_their_traceback(boom, capsys):
    assert cli.main(["boom", "bug"], report=True) == EXIT_BUG == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == (
        "midol: error: unexpected RuntimeError: index 3 is out of bounds (a bug in midol or a "
        "library it uses: please report it with the traceback above)")


def test_debug_flag_or_env_shows_the_traceback(boom, capsys, monkeypatch):
    assert cli.main(["boom", "usage", "--debug"], report=True) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: --threads must be >= 1" in err
    assert err.splitlines()[-1] == "midol: error: --threads must be >= 1"
    assert cli.main(["--debug", "boom", "missing"], report=True) == EXIT_INPUT
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MIDOL_DEBUG", "1")
    assert cli.main(["boom", "diverged"], report=True) == EXIT_DIVERGED
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MIDOL_DEBUG", "0")
    assert cli.main(["boom", "diverged"], report=True) == EXIT_DIVERGED
    assert "Traceback" not in capsys.readouterr().err


def test_argparse_usage_errors_keep_their_own_message_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["route", "x.ckpt"], report=True)
    assert exc.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


def test_exit_code_table():
    assert exit_code(UsageError("x")) == exit_code(TypeError("x")) == EXIT_USAGE
    assert exit_code(UnreadableImageError("a.png", "truncated")) == EXIT_INPUT
    assert exit_code(CheckpointFileError("x")) == exit_code(PermissionError("x")) == EXIT_INPUT
    assert exit_code(UnreadableStreakError("x")) == EXIT_INPUT
    assert exit_code(OSError(28, "No space left on device", "/out/last.ckpt")) == EXIT_INPUT
    assert format_error(OSError(28, "No space left on device", "/out/last.ckpt")) == (
        "midol: error: /out/last.ckpt: No space left on device")
    assert exit_code(FloatingPointError("x")) == EXIT_DIVERGED
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert exit_code(KeyError("x")) == exit_code(RuntimeError("x")) == EXIT_BUG
    # an error at instantiation, wrapped by jsonargparse's Union check, keeps its own class
    inner = FileNotFoundError("weights file not found: w.safetensors")
    wrapped = ValueError("Does not validate against any of the Union subtypes\nSubtypes: "
                         "[<class 'lightning.pytorch.core.module.LightningModule'>, <class "
                         "'NoneType'>]\nErrors:\n  - weights file not found: w.safetensors\n"
                         "  - Expected a <class 'NoneType'>\nGiven value type: <class "
                         "'jsonargparse._namespace.Namespace'>\nGiven value: Namespace("
                         "class_path='midol.methods.PretrainModule', init_args=Namespace())")
    wrapped.__cause__ = inner
    assert exit_code(wrapped) == EXIT_INPUT
    assert format_error(wrapped) == ("midol: error: model midol.methods.PretrainModule: "
                                     "weights file not found: w.safetensors")


# ---------------------------------------------------------------- through `midol fit`
def _fit(tmp_path: Path, capsys, sources=None, check_untrained: bool = True,
         **model) -> tuple[int, str]:
    path = tiny_config(tmp_path / "run", num_workers=0, deterministic=False, max_epochs=1)
    config = yaml.safe_load(path.read_text())
    if sources is not None:
        config["data"]["init_args"]["sources"] = sources
    config["model"]["init_args"].update(model)
    path.write_text(yaml.safe_dump(config))
    code = cli.main(["fit", "--config", str(path)], report=True)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if check_untrained:
        assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training
    lines = [line for line in err.splitlines() if line.startswith("midol: error: ")]
    assert len(lines) == 1, err
    return code, lines[0]


def test_fit_base_lr_zero_exits_2_naming_the_option(tmp_path, capsys):
    code, line = _fit(tmp_path, capsys, base_lr=0)
    assert code == EXIT_USAGE
    assert line == "midol: error: model midol.methods.PretrainModule: base_lr must be > 0, got 0.0"


def test_fit_infinite_source_weight_is_refused(tmp_path, capsys, sample_data):
    xray = str(sample_data / "xray")
    code, line = _fit(tmp_path, capsys, [{"path": xray, "modality": "xray", "weight": float("inf")}])
    assert ".inf" in (tmp_path / "run" / "config.yaml").read_text()
    assert code == EXIT_USAGE
    assert line == (f"midol: error: data midol.data.PretrainDataModule: data source '{xray}' "
                    "(modality 'xray'): weight must be > 0 and finite (a relative sampling "
                    "rate), got inf")


def test_fit_non_utf8_csv_and_truncated_npz_exit_3_naming_the_file(tmp_path, capsys, sample_data):
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("path\nxray/NORMAL/IM-0001-0001.png\nr\xe9sum\xe9.png\n".encode("latin-1"))
    code, line = _fit(tmp_path, capsys, [{"path": str(manifest), "modality": "xray",
                                          "root": str(sample_data)}])
    assert code == EXIT_INPUT
    assert line == (f"midol: error: data source '{manifest}' (modality 'xray'): {manifest} is "
                    "not UTF-8 text (byte 0xe9 at offset 35 is not valid UTF-8); save the CSV as UTF-8")
    npz = tmp_path / "half.npz"
    data = (sample_data / "fundus_retinamnist.npz").read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    code, line = _fit(tmp_path, capsys, [{"path": str(npz), "modality": "fundus"}])
    assert code == EXIT_INPUT
    assert line.startswith(f"midol: error: data source '{npz}' (modality 'fundus'): {npz} is "
                           f"empty, truncated or not an .npz archive ({len(data) // 2} bytes; ")


def test_fit_divergence_exits_4(tmp_path, capsys, monkeypatch):
    import midol.methods.midol as midol_method

    original = midol_method.routing_cross_entropy
    monkeypatch.setattr(midol_method, "routing_cross_entropy",
                        lambda *a, **k: original(*a, **k) * float("nan"))
    code, line = _fit(tmp_path, capsys, check_untrained=False)
    assert code == EXIT_DIVERGED == 4
    assert line.startswith("midol: error: non-finite loss l_route, total at global step 0 "
                           "(epoch 0, batch 0)")


def _streak_folder(root: Path, good_before: int, bad: int, good_after: int) -> Path:
    """Tiny real PNGs ``a_*``, then ``bad`` undecodable ``b_*.png``, then PNGs ``c_*``."""
    root.mkdir()
    pixels = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    for i in range(good_before):
        pixels.save(root / f"a_{i:03d}.png")
    for i in range(bad):
        (root / f"b_{i:03d}.png").write_bytes(b"<html>404 Not Found</html>")
    for i in range(good_after):
        pixels.save(root / f"c_{i:03d}.png")
    return root


def test_fit_stops_at_setup_on_a_streak_of_unreadable_files(tmp_path, capsys):
    folder = _streak_folder(tmp_path / "imgs", 8, 70, 2)
    code, line = _fit(tmp_path, capsys, [{"path": str(folder), "modality": "xray"}])
    assert code == EXIT_INPUT
    assert line.startswith("midol: error: setup check: 70 consecutive unreadable images starting "
                           "at item 8 of 80 (an unreadable image is replaced by one of the next "
                           f"64, so training cannot go on): {folder / 'b_000.png'}: ")
    assert line.endswith("; ... (65 more). Fix or remove these files")


# ---------------------------------------------------------------- the setup check and the streak
def _datamodule(folder: Path) -> PretrainDataModule:
    return PretrainDataModule([DataSource(str(folder), "x")], num_workers=0, batch_size=4,
                              transform=MultiCropTransform(global_size=16, local_size=8, num_local=0))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_setup_check_finds_a_streak_that_the_first_readable_image_hid(tmp_path):
    """200 files, 70 broken in a row from item 100: the first image decodes (the old check
    passed), but every draw in the streak's first items would crash mid-epoch."""
    folder = _streak_folder(tmp_path / "imgs", 100, 70, 30)
    with pytest.raises(UnreadableStreakError) as err:
        _datamodule(folder).setup("fit")
    assert str(err.value).startswith(
        "setup check: 70 consecutive unreadable images starting at item 100 of 200")
    assert str(folder / "b_000.png") in str(err.value) and "b_005.png" not in str(err.value)
    # 63 in a row can always be replaced: setup passes and warns with the share found
    ok = _streak_folder(tmp_path / "ok", 100, 63, 37)
    with pytest.warns(UserWarning, match=r"setup check: \d+ of \d+ sampled images are unreadable"):
        _datamodule(ok).setup("fit")


class _CountingCorpus:
    """A corpus of ``n`` readable items that counts the decodes."""

    def __init__(self, n: int) -> None:
        self.n, self.loads = n, 0

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> np.ndarray:
        self.loads += 1
        return np.zeros((2, 2, 3), np.uint8)


@pytest.mark.parametrize(("n", "decoded"), [(10, 10), (200, 32), (10_000, 158), (10**6, READ_CHECK_MAX)])
def test_setup_check_decodes_a_sample_proportional_to_the_corpus(n, decoded):
    corpus = _CountingCorpus(n)
    assert check_readable(corpus) == 0  # type: ignore[arg-type]
    assert corpus.loads == decoded  # one in 64 (every 64-streak holds one), 32 .. 2048


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mid_epoch_streak_stops_with_the_count_and_first_names(tmp_path):
    """Past the setup check (a corpus too large to check every 64th item), a draw at a streak's
    start stops with an error naming the count and the files, also from a DataLoader worker."""
    folder = _streak_folder(tmp_path / "imgs", 100, 70, 30)
    corpus = Corpus([DataSource(str(folder), "x")])
    dataset = PretrainDataset(corpus, MultiCropTransform(global_size=16, local_size=8, num_local=0))
    with pytest.raises(UnreadableStreakError) as err:
        dataset[100]
    text = str(err.value)
    assert text.startswith("64 consecutive unreadable images starting at item 100 of 200 (an "
                           f"unreadable image is replaced by one of the next 64, so training "
                           f"cannot go on): {folder / 'b_000.png'}: ")
    assert text.endswith("; ... (59 more). Fix or remove these files")
    assert exit_code(err.value) == EXIT_INPUT
    loader = DataLoader(dataset, sampler=[100], batch_size=1, num_workers=1)
    with pytest.raises(UnreadableStreakError) as from_worker:
        next(iter(loader))
    assert "Original Traceback" in str(from_worker.value)  # torch puts the worker's traceback there
    assert format_error(from_worker.value) == f"midol: error: {text}"


# ---------------------------------------------------------------- the console command itself
def test_console_command_prints_one_line_and_exits_3(tmp_path, capsys, monkeypatch):
    """``python -m midol`` / the ``midol`` script (``sys.exit(main())``, reading sys.argv)."""
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    monkeypatch.delenv("MIDOL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["midol", "export", str(empty), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("midol", run_name="__main__")
    assert exc.value.code == 3
    assert capsys.readouterr().err == (
        f"midol: error: {empty} is empty or truncated (not a readable checkpoint): the file has 0 bytes\n")
    assert not os.path.exists(tmp_path / "x")
