"""A checkpoint written by midol 0.1.0 (commit f90bd5f, before the method/task restructuring)
still loads, gives the same teacher features and routing, and exports the same weights.

The fixture and its reference numbers were written by that commit's code
(``tests/fixtures/legacy_midol_f90bd5f.{ckpt,json,yaml}``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from midol.methods import MIDoL
from midol.methods.export import export_checkpoint
from midol.methods.loading import load_method

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CKPT = FIXTURES / "legacy_midol_f90bd5f.ckpt"
REF = json.loads((FIXTURES / "legacy_midol_f90bd5f.json").read_text())


def reference_input() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_legacy_checkpoint_gives_the_same_features_and_routing() -> None:
    module = load_method(CKPT)
    assert isinstance(module, MIDoL)  # saved as midol.methods.PretrainModule
    with torch.no_grad():
        # confidence at temperature 1, as 0.1.0's route_features computed the reference
        features, routes = module.route(reference_input(), temperature=1.0)
    assert list(features.shape) == REF["features_shape"]
    torch.testing.assert_close(features, torch.tensor(REF["features"]), rtol=0, atol=1e-5)
    assert routes["projector"].expert.tolist() == REF["experts"]
    assert routes["projector"].confidence.tolist() == pytest.approx(REF["confidence"], abs=1e-5)


def test_legacy_checkpoint_exports_the_same_weights(tmp_path: Path) -> None:
    (weights,) = export_checkpoint(CKPT, tmp_path)
    tensors = load_file(str(weights))
    assert len(tensors) == REF["export_tensors"]
    total = sum(float(t.double().sum()) for t in tensors.values())
    assert total == pytest.approx(REF["export_sum"], rel=1e-9)
