"""``midol analyze`` on a DEX checkpoint draws Grad-CAM of its director (a plain ViT: the patch
tokens of the last block's first norm), as it does for M-IDoL's teacher."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from midol.cli import main
from tests.helpers.dex import dex_datamodule, tiny_dex
from tests.helpers.tiny import SAMPLE_DATA


def test_analyze_draws_gradcam_of_a_dex_director(tmp_path: Path) -> None:
    L.seed_everything(0)
    run = tmp_path / "run"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                        default_root_dir=str(run), enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=str(run / "checkpoints"), save_last=True,
                                                   save_top_k=0)])
    trainer.fit(tiny_dex(), dex_datamodule())
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: midol.data.PretrainDataModule\n  init_args:\n"
                    "    transform: {class_path: midol.data.SingleViewTransform, init_args: {size: 32}}\n"
                    "    sources:\n"
                    f"      - {{path: {SAMPLE_DATA / 'xray'}, modality: xray}}\n"
                    f"      - {{path: {SAMPLE_DATA / 'pathology'}, modality: pathology}}\n")
    out = tmp_path / "analysis"
    assert main(["analyze", str(run / "checkpoints" / "last.ckpt"), "--data", str(data), "--out",
                 str(out), "--per-modality", "6", "--gradcam-per-modality", "2", "--gradcam-stage", "0",
                 "--perplexity", "3", "--pca-maps", "0", "--no-progress"]) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert "gradcam" not in summary["skipped"], summary["skipped"]
    assert summary["gradcam"]["file"] == "gradcam.png" and len(summary["gradcam"]["images"]) == 4
    pixels = np.asarray(Image.open(out / "gradcam.png").convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10
