"""One seeded batch of the bundled sample corpus (X-ray, pathology, OCT, fundus) as multi-crop
views, for the at-initialisation measurements (grad_norms.py, gate_noise_effect.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from midol.data import DataSource, MultiCropTransform, PretrainDataModule

REPO = Path(__file__).resolve().parents[2]


def sample_batch(batch_size: int, num_local: int, global_size: int = 64, local_size: int = 32) -> dict[str, Any]:
    sources = [DataSource(str(REPO / "sample_data" / m), m) for m in ("xray", "pathology", "oct")]
    sources.append(DataSource(str(REPO / "sample_data/fundus_retinamnist.npz"), "fundus"))
    dm = PretrainDataModule(sources, MultiCropTransform(global_size, local_size, 2, num_local),
                            batch_size=batch_size, num_workers=0, seed=0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))
