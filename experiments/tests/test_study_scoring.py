"""The older studies score through midol eval (experiments/scoring.py): the ablation probe of a
tiny M-IDoL checkpoint gives exactly ``midol eval``'s output (runs.csv and report.json of the CLI
on the same backbones), with CIs and verdicts against the random init; the DEX study's director
and experts parts are scored and tabulated with the plain MAE as baseline; the study tables
print midol eval's numbers."""

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
from tests.helpers.dex import dex_datamodule, tiny_dex
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
    # ... and so does the table over seeds (one seed here)
    from experiments.ablations import combine_seeds

    combined = combine_seeds.markdown([{"meta": meta, "rows": rows}], ["s1.json"], "o.md", "T")
    assert f"| 1. midol | {scoring.ci_cell(scoring.cell(probes['heldout'], 'midol'))} | " in combined
    assert held in combined and scoring.verdict_cell(scoring.versus(probes["heldout"], "midol")) in combined


def test_dex_study_scores_director_and_experts_against_mae(suite, tmp_path):
    from experiments.dex import report, run_dex_study

    torch.manual_seed(0)
    dex = tiny_dex()
    dex_ckpt = _fit(dex, dex_datamodule(), tmp_path / "dex.ckpt")
    torch.manual_seed(0)
    mae_ckpt = _fit(tiny_dex(use_dex=False), dex_datamodule(), tmp_path / "mae.ckpt")
    backbones = run_dex_study.backbones("mae", mae_ckpt) + run_dex_study.backbones("dex", dex_ckpt)
    options = scoring.study_options("knn,linear", bootstrap=200, baseline="mae")
    probes = scoring.score_groups(backbones, tmp_path / "eval", heldout=("retina",), suite=suite,
                                  options=options, reference_seed=0, cache_dir=tmp_path / "cache")
    d = probes["heldout"]
    ref = "random:vit_tiny_patch16_224"
    assert d["references"] == [f"{ref} [cls]", f"{ref} [avg]"]  # one reference for the three
    for label in ("mae", "dex director", "dex experts"):
        for readout in ("cls", "avg"):
            key = f"{label} [{readout}]"
            assert scoring.cell(d, key, "retina") is not None
            assert scoring.versus(d, key)["against"] == f"{ref} [{readout}]"
            if label != "mae":
                assert scoring.versus(d, key, kind="vs_baseline")["against"] == f"mae [{readout}]"

    routing = run_dex_study.routing_set([DataSource(str(SAMPLE_DATA / "xray"), "xray"),
                                         DataSource(str(SAMPLE_DATA / "pathology"), "pathology")], 32, 8, 0)
    blocks = run_dex_study.routing_blocks(dex, routing)
    assert set(blocks) == set(dex.routers()) and all(0 <= b["nmi"] <= 1 for b in blocks.values())
    run = {"meta": {"date": "d", "device": "cpu", "commit": "x", "command": "c", "steps": 2, "seed": 0,
                    "probe_method": scoring.method_text(options), "heldout_tasks": ["retina"],
                    "baseline": "mae"},
           "rows": {"random_init_dex": {"eval": {"blocks": blocks}}, "mae": {"eval": {}, "minutes": 0.1},
                    "dex": {"eval": {"blocks": blocks}, "minutes": 0.2}, "probes": probes}}
    text = report.markdown([run], ["s0.json"], "out.md")
    cell = scoring.ci_cell(scoring.cell(d, "dex experts [cls]", "retina"))
    assert f"| DEX, routed-experts mode [cls] | {scoring.ci_cell(scoring.cell(d, 'dex experts [cls]'))} |" in text
    assert cell in text
    assert scoring.verdict_cell(scoring.versus(d, "dex director [avg]", kind="vs_baseline")) in text
    assert "| plain MAE (same ViT, dense MLPs) [cls] |" in text and "(baseline)" in text
    assert "| random routers (untrained DEX) |" in text
