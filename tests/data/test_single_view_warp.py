"""SingleViewTransform ``warp: crop``: the flip / rotation / random-resized crop of DEX's view,
rendered as one warp of the crop's window, equals the whole-image pipeline (flip, rotate the
whole image, crop, resize) up to interpolation, on real images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from midol.data import load_image
from midol.data.transforms.single_view import (
    SingleViewTransform,
    ViewParams,
    draw_params,
    render_view,
)
from tests.helpers.paths import SAMPLE_DATA


def reference(image: np.ndarray, p: ViewParams, size: int) -> np.ndarray:
    """The whole-image restatement: flip, rotate the full canvas about its centre (constant 0
    border), crop, resize (bicubic up, area down)."""
    h, w = image.shape[:2]
    out = cv2.flip(image, 1) if p.flip else image
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), p.angle, 1.0)
    out = cv2.warpAffine(out, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    x0, y0, cw, ch = p.crop
    crop = out[y0:y0 + ch, x0:x0 + cw]
    inter = cv2.INTER_AREA if max(cw, ch) > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=inter)


def real_images() -> list[np.ndarray]:
    paths = sorted(SAMPLE_DATA.rglob("*.png"))[:2] + sorted(SAMPLE_DATA.rglob("*.jp*g"))[:2]
    assert len(paths) >= 3
    return [load_image(p) for p in paths]


@pytest.mark.parametrize("size", [64, 256])
def test_one_warp_equals_rotate_then_crop_up_to_interpolation(size: int) -> None:
    rng = np.random.default_rng(0)
    for image in real_images():
        h, w = image.shape[:2]
        for _ in range(6):
            p = draw_params(rng, h, w, (0.2, 1.0), 15.0, 0.5)
            got = render_view(image, p, size).astype(float)
            want = reference(image, p, size).astype(float)
            assert got.shape == want.shape == (size, size, 3)
            err = np.abs(got - want).mean()
            assert err < 4.0, (p, err)
            # the same crop at the opposite angle is clearly another picture: the sign is right
            if abs(p.angle) > 5:
                other = reference(image, ViewParams(p.flip, -p.angle, p.crop), size).astype(float)
                assert np.abs(got - other).mean() > 2 * err


def test_draws_follow_the_options() -> None:
    rng = np.random.default_rng(1)
    draws = [draw_params(rng, 300, 400, (0.2, 1.0), 15.0, 0.5) for _ in range(2000)]
    areas = np.array([d.crop[2] * d.crop[3] / (300 * 400) for d in draws])
    assert 0.19 <= areas.min() and areas.max() <= 1.0 and 0.5 < areas.mean() < 0.7
    angles = np.array([d.angle for d in draws])
    assert np.abs(angles).max() <= 15 and abs(angles.mean()) < 0.6
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    for d in draws:
        x0, y0, cw, ch = d.crop
        assert 0 <= x0 and x0 + cw <= 400 and 0 <= y0 and y0 + ch <= 300


def test_transform_switch_is_seeded_and_validated() -> None:
    image = real_images()[0]
    a = SingleViewTransform(size=64, warp="crop", seed=3)
    b = SingleViewTransform(size=64, warp="crop", seed=3)
    a.reseed((5, 1))
    b.reseed((5, 1))
    va, vb = a(image)[0], b(image)[0]
    assert va.shape == (3, 64, 64) and va.dtype.is_floating_point is False
    assert (va == vb).all()
    b.reseed((5, 2))
    assert not (b(image)[0] == va).all()
    with pytest.raises(ValueError, match="warp must be image or crop"):
        SingleViewTransform(warp="window")  # type: ignore[arg-type]
