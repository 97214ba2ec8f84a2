"""Multi-crop views and the evaluation transform on real images."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from midol.data.image_io import load_image
from midol.data.transforms import EvalTransform, MultiCropTransform


@pytest.fixture(scope="module")
def xray(sample_data: Path) -> np.ndarray:
    return load_image(sorted((sample_data / "xray" / "NORMAL").glob("*.png"))[0])


@pytest.fixture(scope="module")
def oct_scan(sample_data: Path) -> np.ndarray:
    return load_image(sample_data / "oct" / "DME" / "DME-30521-1.png")


def test_default_views_count_order_sizes(xray: np.ndarray) -> None:
    # One default for the transform and the datamodules: every view 224 px, as in the
    # M-IDoL authors' code (midol <= 0.1.0's bare transform defaulted local views to 96).
    views = MultiCropTransform(seed=0)(xray)
    assert len(views) == 8
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 8
    assert all(v.dtype == torch.uint8 for v in views)


def test_grayscale_2d_input_gives_three_channels(sample_data: Path) -> None:
    with Image.open(sorted((sample_data / "oct" / "CNV").glob("*.png"))[0]) as im:
        gray = np.asarray(im)
    assert gray.ndim == 2
    t = MultiCropTransform(global_size=64, local_size=32, num_global=3, num_local=2, seed=1)
    views = t(gray)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 3 + [(3, 32, 32)] * 2
    assert t.num_views == 5


def test_seeded_streams_are_reproducible_and_distinct(oct_scan: np.ndarray) -> None:
    a, b = MultiCropTransform(64, 32, seed=7), MultiCropTransform(64, 32, seed=7)
    for va, vb in zip(a(oct_scan), b(oct_scan), strict=True):
        assert torch.equal(va, vb)
    b.set_seed(8)
    assert not all(torch.equal(va, vb) for va, vb in zip(a(oct_scan), b(oct_scan), strict=True))
    locals_ = a(oct_scan)[2:]
    assert not torch.equal(locals_[0], locals_[1])  # local views are not copies of each other


def test_dino_recipe() -> None:
    t = MultiCropTransform()
    jitter = next(op for op in t.local.transforms if isinstance(op, A.ColorJitter))
    # torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) factor ranges
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
    assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1) and jitter.p == 0.8

    def probs(pipe: A.Compose, kind: type) -> list[float]:
        return [op.p for op in pipe.transforms if isinstance(op, kind)]

    assert probs(t.global1, A.GaussianBlur) == [1.0] and probs(t.global2, A.GaussianBlur) == [0.1]
    assert probs(t.local, A.GaussianBlur) == [0.5]
    assert probs(t.global2, A.Solarize) == [0.2]
    assert probs(t.global1, A.Solarize) == [] and probs(t.local, A.Solarize) == []
    for pipe in (t.global1, t.global2, t.local):
        assert probs(pipe, A.HorizontalFlip) == [0.5] and probs(pipe, A.ToGray) == [0.2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_global": 0}, "num_global"),
        ({"num_global": 1, "num_local": 0}, "at least 2 views"),
        ({"num_local": -1}, "num_local"),
        ({"global_size": 4}, "global_size"),
        ({"local_size": 7}, "local_size"),
        ({"global_scale": (0.0, 1.0)}, "global_scale"),
        ({"local_scale": (0.5, 1.2)}, "local_scale"),
        ({"local_scale": (0.6, 0.4)}, "local_scale"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiCropTransform(**kwargs)


def test_eval_transform_centre_crops_non_square(oct_scan: np.ndarray) -> None:
    assert oct_scan.shape[0] != oct_scan.shape[1]
    out = EvalTransform(96)(oct_scan)
    assert out.shape == (3, 96, 96) and out.dtype == torch.uint8
    assert torch.equal(out, EvalTransform(96)(oct_scan))  # deterministic
    with pytest.raises(ValueError, match="size"):
        EvalTransform(4)
