"""The not-at-random check of `midol robustness` (issue 26): a model whose AUC rises when an
input goes missing mostly for positive patients is flagged, with a paired bootstrap CI; one that
ignores presence is not. The gain equals the difference of the two reported AUCs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from midol.analysis.robustness import Protocols, evaluate, macro_auc, write_report


def fake_model(reads_missingness: bool, n: int = 300, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)  # multi-class: 0 negative, 1 positive
    present = np.ones((n, 2), dtype=bool)
    evidence = torch.as_tensor(targets + rng.normal(0, 1.2, n), dtype=torch.float32)  # a weak signal
    table = SimpleNamespace(
        present=present, targets=targets, label_names=["0", "1"], input_names=["left", "right"],
        inputs=[SimpleNamespace(kind="image", name="left"), SimpleNamespace(kind="image", name="right")])

    def predict_rows(rows, mask=None):
        rows = torch.as_tensor(rows)
        score = evidence[rows].clone()
        if reads_missingness and mask is not None:
            score = score + 3.0 * (~mask[:, 0]).float()  # "left eye absent -> sick"
        p1 = torch.sigmoid(score)
        return torch.stack([1 - p1, p1], dim=1)

    return SimpleNamespace(table=table, predict_rows=predict_rows)


@pytest.mark.parametrize("reads", [True, False])
def test_a_model_that_reads_missingness_is_flagged(reads: bool, tmp_path) -> None:
    model = fake_model(reads)
    rows = np.arange(300)
    protocols = Protocols(rates=(0.0,), seeds=(0, 1), drop_each_input=False, natural_subset=False,
                          negative_labels=("0",), bootstrap=100)
    scores = evaluate(model, "m", rows, protocols)
    left = next(s for s in scores if s.protocol == "not_at_random" and s.setting == "left")
    natural = macro_auc(model.predict_rows(rows, torch.ones(300, 2, dtype=torch.bool)),
                        torch.as_tensor(model.table.targets), ["0", "1"])[0]
    assert left.gain == pytest.approx(left.macro_auc - natural, abs=1e-9)
    assert left.gain_ci is not None and left.gain_ci[0] <= left.gain <= left.gain_ci[1]
    assert left.reads_missingness is reads
    if reads:
        assert left.gain > 0.02 and left.gain_ci[0] > 0
    else:
        assert left.gain == pytest.approx(0.0, abs=1e-12)
    report = write_report(scores, tmp_path)["md"].read_text()
    assert "Does the model read the label from what is missing?" in report
    assert ("**flagged: AUC rises" in report) is reads


def test_patient_counts_per_model_when_they_differ(tmp_path) -> None:
    """Issue 26: the patients column showed the first model's count for every model."""
    from midol.analysis.robustness import Score

    scores = [Score("both_eyes", "complete", "all", 0.7, patients=320),
              Score("left_only", "complete", "all", 0.6, patients=305),
              Score("both_eyes", "sweep", "0", 0.7, patients=320),
              Score("left_only", "sweep", "0", 0.6, patients=320)]
    report = write_report(scores, tmp_path)["md"].read_text()
    assert "| complete | all | 320 / 305 |" in report
    assert "| sweep | drop rate 0 | 320 |" in report


def test_a_patient_without_any_readable_input_is_named_and_left_out() -> None:
    """Issue 26: a corrupt JPEG that was a patient's only input stopped the report with
    "1 patient(s) have no present input to begin with", naming neither patient nor file."""
    model = fake_model(reads_missingness=False, n=50)
    table = model.table
    table.present = table.present.copy()
    table.present[7] = False
    table.patient_ids = [f"P{i:03d}" for i in range(50)]
    table.image_files = lambda name: [f"{name}_{i}.jpg" for i in range(50)]
    protocols = Protocols(rates=(0.0, 0.3), seeds=(0,), drop_each_input=False, natural_subset=False,
                          negative_labels=("0",), bootstrap=0)
    with pytest.warns(UserWarning, match=r"m: 1 patient\(s\) have no readable input and are left out "
                                         r"of the robustness scores: P007 \(their files: left_7.jpg, right_7.jpg\)"):
        scores = evaluate(model, "m", np.arange(50), protocols)
    assert {s.patients for s in scores} == {49}
