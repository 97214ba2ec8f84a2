"""The older studies score through midol eval (experiments/scoring.py): the ablation probe of a
tiny M-IDoL checkpoint gives exactly ``midol eval``'s output (runs.csv and report.json of the CLI
on the same backbones), with CIs and verdicts against the random init; the study tables print
midol eval's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from experiments import scoring
from midol.cli import main as midol_main
from midol.data.sources import DataSource
from tests.helpers.tiny import SAMPLE_DATA, tiny_datamodule, tiny_module

FAST = scoring.study_options("knn,linear", bootstrap=200)
SWIN_REF = "random:swin_tiny_patch4_window7_224"


def _fit(module: L.LightningModule, datamodule: L.LightningDataModule, path: Path) -> Path:
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=path.parent)
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """Two real tasks of the sample corpus: 'xray' (corpus) and 'retina' (held out)."""
    tasks = [
        {"name": "xray", "modality": "xray", "type": "binary", "train": {"path": "xray"},
         "test_fraction": 0.3},
        {"name": "retina", "modality": "fundus", "type": "ordinal",
         "train": {"path": "fundus_retinamnist.npz", "split": "train"}, "test_fraction": 0.3},
    ]
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "two-task", "data_root": str(SAMPLE_DATA), "tasks": tasks}))
    return path


def test_ablation_probes_are_midol_evals_output(suite, tmp_path):
    from experiments.ablations import evaluate, run_ablations

    torch.manual_seed(0)
    module = tiny_module()
    ckpt = _fit(module, tiny_datamodule(batch_size=8), tmp_path / "midol.ckpt")
    cache = tmp_path / "cache"
    probes = evaluate.probes(ckpt, "midol", tmp_path / "eval", seed=1, suite=suite, heldout=("retina",),
                             options=FAST, cache_dir=cache)
    assert set(probes) == {"heldout", "corpus"}
    assert probes["heldout"]["tasks"] == ["retina"] and probes["corpus"]["tasks"] == ["xray"]
    for group, task in (("heldout", "retina"), ("corpus", "xray")):
        d = probes[group]
        assert d["rows"] == ["midol", SWIN_REF] and d["references"] == [SWIN_REF]
        for setting in ("knn k=20", "linear full"):
            for row in d["rows"]:
                c = scoring.cell(d, row, task, setting)
                assert c is not None and c["lo"] <= c["mean"] <= c["hi"]
            pooled = scoring.versus(d, "midol", setting=setting)
            assert pooled is not None and pooled["against"] == SWIN_REF
            assert pooled["verdict"] in ("better", "worse", "not distinguishable")
            assert pooled["lo"] <= pooled["diff"] <= pooled["hi"]
        assert Path(d["report"]).is_file() and (Path(d["report"]).parent / "runs.csv").is_file()

    # the same backbone through the `midol eval` command (its random reference: seed 0)
    ours = scoring.score([f"midol={ckpt}"], tmp_path / "ours", suite=suite, tasks=["retina"],
                         options=FAST, cache_dir=cache)
    assert midol_main(["eval", "--suite", str(suite), "--backbones", f"midol={ckpt}", "--out",
                       str(tmp_path / "cli"), "--cache_dir", str(cache), "--protocols", "knn,linear",
                       "--knn_k", "20", "--bootstrap", "200", "--tasks", "retina"]) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert (tmp_path / "ours" / "runs.csv").read_text() == (tmp_path / "cli" / "runs.csv").read_text()
    for key in ("rows", "tasks", "summaries", "comparisons", "options"):
        assert ours[key] == cli[key], key

    # the ablation table prints those numbers with their CIs and verdicts
    routing = evaluate.routing_set([DataSource(str(SAMPLE_DATA / "xray"), "xray"),
                                    DataSource(str(SAMPLE_DATA / "pathology"), "pathology")], 32, 8, 0)
    route = evaluate.routing_metrics(module, routing, 0)
    assert set(route) == {"routing", "kmeans_nmi"}
    meta = {"date": "d", "device": "cpu", "load_before": "", "load_after": "", "command": "c",
            "commit": "x", "epochs": 1, "samples_per_epoch": 8, "steps": 2, "seed": 1,
            "per_modality": 8, "corpus_images": 101, "corpus_counts": {}, "routing_images": 16,
            "routing_counts": {}, "modalities": routing.names, "suite": str(suite),
            "heldout_tasks": ["retina"], "corpus_tasks": ["xray"],
            "probe_method": scoring.method_text(FAST), "knn_setting": "knn k=20"}
    rows = [{"name": "random_init", "label": "0. random init", "eval": route, "minutes": 0.0},
            {"name": "midol", "label": "1. midol", "eval": route, "probes": probes, "minutes": 0.1,
             "warnings": []}]
    text = run_ablations.markdown(rows, meta, True)
    held = scoring.ci_cell(scoring.cell(probes["heldout"], "midol", "retina"))
    assert f"| 1. midol | {scoring.ci_cell(scoring.cell(probes['heldout'], 'midol'))} | " in text
    assert held in text and "[" in held
    assert scoring.verdict_cell(scoring.versus(probes["corpus"], "midol")) in text
    assert f"| 0. random init | {scoring.ci_cell(scoring.cell(probes['heldout'], SWIN_REF))} | (reference) |" in text

