"""`midol export` writes a Hugging Face style model card into the timm local-dir folder, filled
only from what the checkpoint and its run recorded ("not recorded" otherwise)."""

from __future__ import annotations

import json

import timm
import torch
import yaml
from safetensors.torch import load_file

from midol.cli import main
from midol.data.sources import DataSource, source_table
from midol.utils.run_logs import LOG_DIRS_KEY
from tests.helpers.finetune import SAMPLE_DATA, pretrain_checkpoint

VERDICTS = [
    "## Suite-level verdicts (auc, pooled over tasks)",
    "",
    "| setting | backbone | against | tasks | seeds paired | difference [95 % CI] | p | verdict |",
    "|---|---|---|---|---|---|---|---|",
    "| knn: k=10 | mine | random init (random) | 3 | 1 | +0.120 [+0.050, +0.190] | 0.002 | **better** |",
]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_of_a_bare_checkpoint_loads_in_timm_and_says_what_is_not_recorded(
        tmp_path_factory, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path_factory)
    assert main(["export", str(ckpt), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "teacher_backbone_timm"
    card = (folder / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-feature-extraction"
    assert front["tags"][:2] == ["midol", "medical-imaging"] and "license" in front
    assert "`swin_tiny_patch4_window7_224`" in card and "| image size | 32 px |" in card
    assert "midol.methods.midol.MIDoL" in card
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert f"| num_experts | {hparams['num_experts']} |" in card
    assert f"| teacher_temp | {hparams['teacher_temp']} |" in card
    assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in card
    # logger=False, no run files: corpus, batch, routing table and evaluation are not recorded
    assert "| batch size per device | not recorded |" in card
    for section in ("## Pre-training corpus", "## Routing table", "## Evaluation"):
        assert card.split(section)[1].split("##")[0].strip().startswith("not recorded"), section

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    meta = json.loads((tmp_path / "teacher_backbone.json").read_text())
    reference = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0,
                                  **meta["overrides"]).eval()
    reference.load_state_dict(load_file(str(tmp_path / "teacher_backbone.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


def test_card_reads_the_runs_config_summary_routing_table_and_eval_report(tmp_path_factory, tmp_path):
    run = tmp_path / "run"
    logs = run / "logs" / "version_0"
    logs.mkdir(parents=True)
    (run / "checkpoints").mkdir()
    checkpoint = torch.load(pretrain_checkpoint(tmp_path_factory), map_location="cpu", weights_only=True)
    checkpoint[LOG_DIRS_KEY] = {"dirs": [str(logs)], "root": str(run)}
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, ckpt)
    sources = [DataSource(str(SAMPLE_DATA / "xray"), "xray"),
               DataSource(str(SAMPLE_DATA / "pathology"), "pathology", weight=2.0)]
    config = {"trainer": {"max_steps": 2, "devices": 1},
              "data": {"class_path": "midol.data.PretrainDataModule",
                       "init_args": {"batch_size": 8, "sources": [
                           {"path": s.path, "modality": s.modality, "weight": s.weight}
                           for s in sources]}}}
    (logs / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "fit.log").write_text("pre-training corpus:\n" + source_table(sources, [60, 41]) + "\n")
    (run / "summary.json").write_text(json.dumps({"images_seen": 16, "global_step": 2,
                                                  "final_loss": 1.25}))
    routing = "| expert | xray | pathology |\n|---|---:|---:|\n| 0 | 60 | 1 |"
    (run / "routing_table.md").write_text(routing + "\n")
    report = tmp_path / "report.md"
    report.write_text("# midol eval: tiny\n\n## Provenance\n\nx\n\n" + "\n".join(VERDICTS)
                      + "\n\n## knn: k=10 (auc)\n\nper task\n")

    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--eval_report", str(report)]) == 0
    card = (out / "teacher_backbone_timm" / "README.md").read_text()
    assert VERDICTS[-1] in card and "per task" not in card
    assert routing in card
    assert "| batch size per device | 8 |" in card and "| planned max_steps | 2 |" in card
    assert "| final loss | 1.25 |" in card
    assert f"| {sources[0].path} | xray | auto | 1.0 | 60 | 42.3% |" in card
    assert f"| {sources[1].path} | pathology | auto | 2.0 | 41 | 57.7% |" in card
    assert "not recorded" not in card.split("## Pre-training corpus")[1].split("## Routing")[0]

    skipped = tmp_path / "skipped"
    assert main(["export", str(ckpt), "--out", str(skipped), "--no_model_card"]) == 0
    assert not (skipped / "teacher_backbone_timm" / "README.md").exists()
    timm.create_model(f"local-dir:{skipped / 'teacher_backbone_timm'}", pretrained=True)
