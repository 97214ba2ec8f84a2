"""A tiny DEX (same code paths as ViT-B) on the bundled real sample corpus, for fast tests."""

from __future__ import annotations

from typing import Any

from midol.data import DataSource, PretrainDataModule, SingleViewTransform
from midol.methods import DEX
from tests.helpers.tiny import SAMPLE_DATA

TINY_VIT: dict[str, Any] = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def tiny_dex(**overrides: Any) -> DEX:
    kwargs: dict[str, Any] = dict(
        backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, img_size=32, num_experts=4,
        top_k=2, decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_epochs=0,
        base_lr=0.05,
    )
    kwargs.update(overrides)
    return DEX(**kwargs)


def dex_datamodule(batch_size: int = 8, **overrides: Any) -> PretrainDataModule:
    """X-ray and pathology folders of the sample corpus (101 real images), one 32 px view."""
    kwargs: dict[str, Any] = dict(
        sources=[DataSource(str(SAMPLE_DATA / "xray"), "xray"),
                 DataSource(str(SAMPLE_DATA / "pathology"), "pathology")],
        batch_size=batch_size, num_workers=0, transform=SingleViewTransform(32), seed=0,
    )
    kwargs.update(overrides)
    return PretrainDataModule(**kwargs)
