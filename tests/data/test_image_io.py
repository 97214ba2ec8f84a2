"""load_image on real files in every pixel mode the loader promises to handle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midol.data.image_io import IMAGE_EXTENSIONS, UnreadableImageError, is_image_file, load_image


@pytest.fixture(scope="module")
def xray_png(sample_data: Path) -> Path:
    return sorted((sample_data / "xray" / "PNEUMONIA").glob("*.png"))[0]


@pytest.fixture(scope="module")
def tissue_jpg(sample_data: Path) -> Path:
    return sorted((sample_data / "pathology" / "TUM").glob("*.jpg"))[0]


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_real_png_and_jpeg(xray_png: Path, tissue_jpg: Path) -> None:
    xray = load_image(xray_png)
    assert xray.dtype == np.uint8 and xray.shape == (128, 128, 3) and xray.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(xray[..., c], _gray(xray_png))
    tissue = load_image(str(tissue_jpg))
    assert tissue.shape == (112, 112, 3)
    np.testing.assert_array_equal(tissue, _rgb(tissue_jpg))
    assert tissue.std(axis=2).mean() > 1  # real colour, not grey


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_is_scaled_not_clipped(xray_png: Path, tmp_path: Path, suffix: str) -> None:
    gray8 = _gray(xray_png)
    path = tmp_path / f"xray16{suffix}"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    out = load_image(path)
    assert np.abs(out[..., 0].astype(int) - gray8.astype(int)).max() <= 1
    assert (out[..., 0] < 255).mean() > 0.5  # clipping to 8 bits would saturate almost everything


def test_16bit_big_endian_and_32bit_int_tiff(xray_png: Path, tmp_path: Path) -> None:
    gray8 = _gray(xray_png)
    Image.fromarray((gray8.astype(np.uint16) * 257).astype(">u2")).save(tmp_path / "be.tif")
    Image.fromarray(gray8.astype(np.int32) * 257).save(tmp_path / "i32.tif")
    for name in ("be.tif", "i32.tif"):
        out = load_image(tmp_path / name)
        assert np.abs(out[..., 1].astype(int) - gray8.astype(int)).max() <= 1, name


def test_float_tiff_is_min_max_scaled(xray_png: Path, tmp_path: Path) -> None:
    gray8 = _gray(xray_png).astype(np.float32)
    Image.fromarray(gray8 / 100.0 - 3.0).save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")[..., 0].astype(float)
    expected = (gray8 - gray8.min()) * 255.0 / (gray8.max() - gray8.min())
    assert np.abs(out - expected).max() <= 1


def test_rgba_and_la_drop_alpha(tissue_jpg: Path, xray_png: Path, tmp_path: Path) -> None:
    rgb = _rgb(tissue_jpg)
    alpha = np.full(rgb.shape[:2], 0, np.uint8)  # fully transparent: colours must survive anyway
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    gray = _gray(xray_png)
    Image.fromarray(np.dstack([gray, np.full_like(gray, 128)]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png")[..., 2], gray)


def test_palette_and_bilevel(tissue_jpg: Path, xray_png: Path, tmp_path: Path) -> None:
    with Image.open(tissue_jpg) as im:
        pal = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "p.gif")
    pal.save(tmp_path / "p_transparent.png", transparency=0)
    expected = np.asarray(pal.convert("RGB"))
    for name in ("p.png", "p.gif", "p_transparent.png"):
        with Image.open(tmp_path / name) as im:
            assert im.mode == "P"
        np.testing.assert_array_equal(load_image(tmp_path / name), expected, err_msg=name)
    with Image.open(xray_png) as im:
        im.convert("1").save(tmp_path / "bw.png")
    assert set(np.unique(load_image(tmp_path / "bw.png")).tolist()) <= {0, 255}


def test_cmyk_jpeg(tissue_jpg: Path, tmp_path: Path) -> None:
    rgb = _rgb(tissue_jpg)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 8


def test_truncated_jpeg_raises(tissue_jpg: Path, tmp_path: Path) -> None:
    data = tissue_jpg.read_bytes()
    bad = tmp_path / "half.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match=r"half.jpg") as info:
        load_image(bad)
    assert info.value.path == str(bad) and "truncated" in info.value.reason.lower()


def test_non_image_and_missing_files_raise(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image\n")
    with pytest.raises(UnreadableImageError, match=r"notes.png"):
        load_image(fake)
    with pytest.raises(UnreadableImageError, match=r"missing.png"):
        load_image(tmp_path / "missing.png")


def test_extensions_are_case_insensitive() -> None:
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"} == set(
        IMAGE_EXTENSIONS
    )
    assert is_image_file("A/B/scan.JPEG") and is_image_file("x.TiF")
    assert not is_image_file("x.npz") and not is_image_file("labels.csv")
