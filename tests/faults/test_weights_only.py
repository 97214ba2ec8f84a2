"""Checkpoints are read with weights_only=True: a checkpoint carrying a pickled callable is
refused by `midol fit --ckpt_path` and `midol export`, and its payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch

from midol.cli import main
from tests.helpers.faults import tiny_config
from tests.helpers.tiny import tiny_datamodule, tiny_module


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: arbitrary code, as in a malicious file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def evil_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real one-step pre-training checkpoint plus a pickled payload; and the payload's marker."""
    root = tmp_path_factory.mktemp("evil")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(tiny_module(), datamodule=tiny_datamodule())
    good = root / "good.ckpt"
    trainer.save_checkpoint(good)
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    marker = root / "payload_ran"
    checkpoint["hyper_parameters"]["note"] = _Payload(marker)
    evil = root / "evil.ckpt"
    torch.save(checkpoint, evil)
    assert not marker.exists()
    return evil, marker


def test_weights_only_export_refuses_pickled_objects(evil_checkpoint, tmp_path: Path) -> None:
    evil, marker = evil_checkpoint
    with pytest.raises(ValueError, match="midol refuses to unpickle") as err:
        main(["export", str(evil), "--out", str(tmp_path / "out")])
    assert str(evil) in str(err.value) and "Unsupported global" in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("explicit", [False, True])
def test_weights_only_resume_refuses_pickled_objects(
    evil_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, explicit: bool
) -> None:
    """Lightning's restore leaves weights_only to torch.load, whose default is True; passing
    ``--weights_only true`` also overrides a TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD opt-out."""
    evil, marker = evil_checkpoint
    config = tiny_config(tmp_path / "run", num_workers=0, deterministic=False)
    args = ["fit", "--config", str(config), "--ckpt_path", str(evil)]
    if explicit:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        args += ["--weights_only", "true"]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        main(args)
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one step trained


def test_weights_only_payload_is_live(evil_checkpoint) -> None:
    """The refusals above are meaningful: unpickling the file for real runs the payload."""
    evil, marker = evil_checkpoint
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()
