"""A backbone name that timm would fetch from the Hugging Face Hub (``hf-hub:...``), read from a
checkpoint or an export JSON, is refused with one line before timm sees it: nothing is fetched
(issue 26, break 8: ``midol export`` of such a checkpoint requested the repo's config.json)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from midol.cli import main
from midol.errors import EXIT_USAGE
from midol.methods.export import export_method
from midol.models.backbone import build_backbone
from midol.tasks.backbones import load_backbone
from tests.helpers.tiny import tiny_module

HUB = "hf-hub:attacker/model"


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name lookup and connection attempted, refused (the list must stay empty)."""
    attempts: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise OSError("network disabled in this test")

    def connect(self, address):
        attempts.append(f"connect {address}")
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


@pytest.mark.parametrize("name", [HUB, "HF-HUB:attacker/model", "hf_hub:attacker/model",
                                  " Hf_Hub:timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k",
                                  "https://example.org/model"])
def test_hub_spellings_are_refused_before_timm(network, name):
    with pytest.raises(ValueError) as err:
        build_backbone(name)
    assert f"backbone {name.strip()!r} is a Hugging Face Hub (or URL) spelling" in str(err.value)
    assert "midol never downloads" in str(err.value) and "\n" not in str(err.value)
    assert network == []


def test_registry_and_local_dir_names_are_not_refused(network, tmp_path: Path):
    assert build_backbone("resnet18").num_features == 512
    with pytest.raises(FileNotFoundError):  # timm reads the local folder: not a Hub name
        build_backbone(f"local-dir:{tmp_path / 'missing'}")
    assert network == []


def test_export_json_naming_a_hub_model_is_refused(network, tmp_path: Path):
    module = tiny_module()
    [weights] = _export(module, tmp_path)
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["timm_model"] = HUB
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as err:
        load_backbone(checkpoint=weights)
    assert str(err.value).startswith(f"{meta_path}: backbone {HUB!r} is a Hugging Face Hub")
    assert network == []


def test_checkpoint_naming_a_hub_backbone_is_refused_by_export(network, tmp_path: Path, capsys):
    module = tiny_module()
    hparams = {**dict(module.hparams), "backbone": HUB}
    ckpt = tmp_path / "hub.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, ckpt)
    code = main(["export", str(ckpt), "--out", str(tmp_path / "export")], report=True)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE == 2
    lines = [line for line in err.splitlines() if line.startswith("midol: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"midol: error: {ckpt}: backbone {HUB!r} is a Hugging Face Hub")
    assert network == [] and not (tmp_path / "export").exists()


def _export(module, out: Path) -> list[Path]:
    with pytest.warns(UserWarning, match="exporting an untrained model"):
        return export_method(module, out)
