"""Paper-ready figures: PDF/SVG/PNG at a chosen dpi, colour bars, axis titles, distinct
palettes, and a warning when a Grad-CAM grid is too coarse to read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from midol.analysis import plotting
from midol.analysis.gradcam import grad_cam, gradcam_figure
from midol.analysis.heatmap import routing_heatmap
from midol.analysis.plotting import new_figure, save_figure, set_output
from midol.analysis.tsne import embedding_figure


@pytest.fixture(autouse=True)
def restore_output():
    saved = dict(plotting.OUTPUT)
    yield
    plotting.OUTPUT.update(saved)


def test_formats_and_dpi(tmp_path):
    fig = new_figure(2, 1)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    first = save_figure(fig, tmp_path / "curve.png", formats=("png", "pdf", "svg"), dpi=200)
    assert first == tmp_path / "curve.png"
    assert (tmp_path / "curve.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "curve.svg").read_bytes()[:500]
    from PIL import Image

    assert Image.open(first).size == (400, 200)  # 2 x 1 inches at 200 dpi
    set_output(["svg"], dpi=300)
    assert save_figure(fig, tmp_path / "b.png") == tmp_path / "b.svg"
    with pytest.raises(ValueError, match="figure formats must be among"):
        set_output(["jpg"])
    with pytest.raises(ValueError, match="dpi must lie"):
        set_output(["png"], dpi=5)


class Grid(nn.Module):
    """A backbone with one stage whose feature map is 2 x 2."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16))

    def forward(self, x):
        return self.layers(x).mean(dim=(2, 3))


def test_coarse_gradcam_warns_and_figure_has_a_colour_bar():
    images = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"Grad-CAM grid is 2x2 .*\(--gradcam-stage -2\)"):
        cams = grad_cam(Grid(), images, lambda f: f.norm(dim=-1))
    fig = gradcam_figure(np.zeros((2, 3, 32, 32), np.uint8), cams, ["a", "b"], "t")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "Grad-CAM (per image, 0-1)" in labels  # the colour bar's axis


def test_heatmap_axis_titles_and_tsne_palettes():
    fig = routing_heatmap(np.array([[3, 0], [1, 4]]), ["xray", "oct"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "modality (source label)" and ax.get_ylabel() == "expert (top-1 routing)"
    points = np.random.default_rng(0).normal(size=(12, 2))
    labels = np.arange(12) % 2
    fig = embedding_figure(points, labels, ["xray", "oct"], labels, num_experts=2)
    first = [tuple(c.get_facecolor()[0][:3]) for c in fig.axes[0].collections]
    second = [tuple(c.get_facecolor()[0][:3]) for c in fig.axes[1].collections]
    assert first[0] != second[0]  # modality 0 and expert 0 are not the same colour
