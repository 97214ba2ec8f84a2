"""PCA feature maps (midol.analysis.pca_maps, `midol analyze --pca-maps`): patch features of a
tiny Swin and a tiny ViT on real sample images, the colours against a plain numpy
restatement, the foreground threshold on a planted two-cluster map, and the figure files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from midol.analysis.pca_maps import patch_features, pca_figure, pca_rgb
from midol.analysis.plotting import save_figure
from midol.data import Corpus, DataSource, EvalTransform
from tests.helpers.paths import SAMPLE_DATA
from tests.helpers.tiny import TINY_SWIN


def sample_images(n: int = 4, size: int = 32) -> torch.Tensor:
    corpus = Corpus([DataSource(str(SAMPLE_DATA / "xray"), "xray"),
                     DataSource(str(SAMPLE_DATA / "pathology"), "pathology")])
    picks = np.linspace(0, len(corpus) - 1, n).astype(int)
    return torch.stack([EvalTransform(size)(corpus.load(int(i))) for i in picks])


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.25


def reference_rgb(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """numpy: SVD of the centred foreground features, first 3 components, largest-|loading|
    positive, min-max scaled per component; background 0."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
    fg = flat[mask.reshape(-1)]
    centred = fg - fg.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[:3].T
    v = v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(3)])
    proj = centred @ v
    scaled = (proj - proj.min(axis=0)) / (proj.max(axis=0) - proj.min(axis=0))
    out = np.zeros((flat.shape[0], 3))
    out[mask.reshape(-1)] = scaled
    return out.reshape(*features.shape[:3], 3)


def test_patch_features_of_a_tiny_swin_and_a_tiny_vit():
    torch.manual_seed(0)
    images = normalised(sample_images(3))
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **TINY_SWIN)
    feats = patch_features(swin, images)
    assert feats.shape == (3, 1, 1, 128)  # 32 px / 4 / 2 / 2 / 2; 8 x embed_dim
    # an earlier-stage grid comes from the same NHWC path: a 2-stage Swin keeps a 4 x 4 grid
    swin2 = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                              img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2)
    assert patch_features(swin2, images).shape == (3, 4, 4, 32)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=24, depth=1, num_heads=2, reg_tokens=2)
    vit.train()
    tokens = vit.forward_features(images)
    assert tokens.shape == (3, 3 + 16, 24)  # class + 2 register tokens + 4 x 4 patches
    feats = patch_features(vit, images)
    assert vit.training  # mode restored
    assert feats.shape == (3, 4, 4, 24)
    with torch.no_grad():
        expected = vit.eval().forward_features(images)[:, 3:].reshape(3, 4, 4, 24)
    torch.testing.assert_close(feats, expected)


def test_pca_rgb_equals_the_numpy_restatement():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=24, depth=1, num_heads=2)
    feats = patch_features(vit, normalised(sample_images(4))).numpy()
    rgb, mask = pca_rgb(feats)
    assert rgb.shape == (4, 4, 4, 3) and mask.shape == (4, 4, 4) and mask.dtype == bool
    assert 0 < mask.sum() < mask.size
    assert rgb.min() >= 0 and rgb.max() <= 1 and np.all(rgb[~mask] == 0)
    np.testing.assert_allclose(rgb, reference_rgb(feats, mask), atol=1e-5)
    # no thresholding: every patch is foreground
    rgb_all, all_fg = pca_rgb(torch.from_numpy(feats), background=False)
    assert all_fg.all()
    np.testing.assert_allclose(rgb_all, reference_rgb(feats, all_fg), atol=1e-5)
    # a percentile threshold keeps that share; invert keeps the rest
    _, top = pca_rgb(feats, percentile=75)
    _, rest = pca_rgb(feats, percentile=75, invert=True)
    assert top.sum() == mask.size // 4 and np.array_equal(rest, ~top)


def test_the_threshold_recovers_a_planted_foreground():
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 0.1, size=(2, 6, 6, 32))
    planted = np.zeros((2, 6, 6), dtype=bool)
    planted[0, :, :3] = planted[1, 3:, :] = True  # half of the patches
    shift = rng.normal(0, 1, size=32)
    shift *= np.sign(shift[np.abs(shift).argmax()])  # largest entry positive: the + side
    feats[planted] += 3 * shift
    rgb, mask = pca_rgb(feats)
    np.testing.assert_array_equal(mask, planted)
    np.testing.assert_allclose(rgb, reference_rgb(feats, planted), atol=1e-5)
    assert np.array_equal(pca_rgb(feats, invert=True)[1], ~planted)


def test_pca_figure_in_every_format(tmp_path):
    images = sample_images(2)
    rgb, mask = pca_rgb(np.random.default_rng(1).normal(size=(2, 4, 4, 8)))
    fig = pca_figure(images.numpy(), rgb, mask, ["a", "b"])
    save_figure(fig, tmp_path / "pca_maps.png", formats=("png", "svg"))
    assert (tmp_path / "pca_maps.png").stat().st_size > 1000
    assert "<svg" in (tmp_path / "pca_maps.svg").read_text()[:500]
    with pytest.raises(ValueError, match="as many maps"):
        pca_figure(images.numpy(), rgb[:1])


def test_analyze_writes_pca_maps_in_every_format(tmp_path):
    from midol.cli import main
    from tests.helpers.analysis import tiny_run

    run = tiny_run(tmp_path)
    config = tmp_path / "data.yaml"
    config.write_text(
        "sources:\n"
        f"  - {{path: {SAMPLE_DATA / 'xray'}, modality: xray}}\n"
        f"  - {{path: {SAMPLE_DATA / 'pathology'}, modality: pathology}}\n"
    )
    out = tmp_path / "analysis"
    assert main(["analyze", str(run / "checkpoints" / "last.ckpt"), "--data", str(config),
                 "--out", str(out), "--per-modality", "3", "--embedding", "pca",
                 "--gradcam-per-modality", "0", "--pca_maps", "2", "--format", "png", "svg",
                 "--image-size", "64", "--no-progress"]) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["pca_maps"]["file"] == "pca_maps.png"
    assert summary["pca_maps"]["grid"] == [2, 2]  # 64 px Swin, last stage
    assert len(summary["pca_maps"]["images"]) == 2
    assert "pca_maps.png" in summary["files"]
    assert (out / "pca_maps.png").stat().st_size > 1000 and (out / "pca_maps.svg").is_file()
