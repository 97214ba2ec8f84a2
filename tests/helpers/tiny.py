"""A tiny M-IDoL (same code paths as Swin-B) on the bundled real sample corpus, for fast tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from midol.data import DataSource, MultiCropTransform, PretrainDataModule
from midol.methods import PretrainModule

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
TINY_SWIN: dict[str, Any] = dict(
    img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2
)


def tiny_module(**overrides: Any) -> PretrainModule:
    kwargs: dict[str, Any] = dict(
        backbone="swin_tiny_patch4_window7_224",
        backbone_kwargs=TINY_SWIN,
        num_experts=3,
        expert_hidden_dim=32,
        bottleneck_dim=16,
        out_dim=64,
        warmup_epochs=1,
        freeze_last_layer_epochs=0,
    )
    kwargs.update(overrides)
    return PretrainModule(**kwargs)


def tiny_datamodule(batch_size: int = 8, num_local: int = 2, **overrides: Any) -> PretrainDataModule:
    """X-ray and pathology folders of the sample corpus: 101 real images."""
    kwargs: dict[str, Any] = dict(
        sources=[
            DataSource(str(SAMPLE_DATA / "xray"), "xray"),
            DataSource(str(SAMPLE_DATA / "pathology"), "pathology"),
        ],
        batch_size=batch_size,
        num_workers=0,
        transform=MultiCropTransform(global_size=32, local_size=16, num_global=2,
                                     num_local=num_local),
    )
    kwargs.update(overrides)
    return PretrainDataModule(**kwargs)


def save_trained_checkpoint(module: Any, path: Path, batch_size: int = 8) -> Path:
    """One optimiser step of ``module`` on the tiny datamodule, saved as a Lightning checkpoint."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=path.parent)
    trainer.fit(module, tiny_datamodule(batch_size=batch_size))
    trainer.save_checkpoint(path)
    return path
