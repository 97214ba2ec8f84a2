"""`midol analyze` and its plots, from a tiny real checkpoint: every PNG is a non-empty image of
the expected size, and the numbers in analysis.json agree with independent computations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol.analysis.confusion import confusion_counts, confusion_figure
from midol.analysis.curves import read_metrics, smooth
from midol.analysis.features import per_modality_indices
from midol.analysis.gradcam import grad_cam, gradcam_figure
from midol.analysis.heatmap import routing_heatmap
from midol.analysis.plotting import save_figure
from midol.cli import main, run_lightning
from midol.data import Corpus, EvalTransform
from midol.methods.loading import load_pretrain_module
from midol.utils.cluster_metrics import normalized_mutual_info, purity
from tests.helpers.analysis import sample_sources, tiny_run
from tests.helpers.tiny import SAMPLE_DATA

PER_MODALITY = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("analysis"))


def data_config(path: Path) -> Path:
    path.write_text(
        "data:\n  class_path: midol.data.PretrainDataModule\n  init_args:\n    transform: {init_args: {global_size: 32}}\n    sources:\n"
        f"      - {{path: {SAMPLE_DATA / 'xray'}, modality: xray}}\n"
        f"      - {{path: {SAMPLE_DATA / 'pathology'}, modality: pathology}}\n"
        f"      - {{path: {SAMPLE_DATA / 'oct'}, modality: oct}}\n"
        f"      - {{path: {SAMPLE_DATA / 'fundus_retinamnist.npz'}, modality: fundus}}\n"
    )
    return path


def check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A PNG of ``size`` (width, height) pixels that is not one flat colour."""
    assert path.is_file(), path
    image = Image.open(path)
    assert image.size == size, (path.name, image.size)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return pixels


def test_analyze_writes_every_plot_and_consistent_numbers(run_dir, tmp_path):
    out = tmp_path / "analysis"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    config = data_config(tmp_path / "data.yaml")
    assert main(["analyze", str(ckpt), "--data", str(config), "--out", str(out),
                 "--per-modality", str(PER_MODALITY), "--perplexity", "5", "--smoothing", "2",
                 "--no-progress"]) == 0
    summary = json.loads((out / "analysis.json").read_text())
    # 3 experts x 4 modalities; 2 panels for t-SNE; 2 loss panels; 4 modalities x 2 Grad-CAM images
    check_png(out / "routing_matrix.png", (640, 345))
    check_png(out / "embedding.png", (1100, 500))
    check_png(out / "loss_curves.png", (900, 350))
    check_png(out / "gradcam.png", (1520, 420))
    assert summary["files"] == ["embedding.png", "gradcam.png", "loss_curves.png", "pca_maps.png",
                                "routing_matrix.png"]
    assert summary["images_per_modality"] == {"xray": 12, "pathology": 12, "oct": 12, "fundus": 12}

    # the routing counts equal the teacher router applied image by image to the same images
    module = load_pretrain_module(ckpt)
    corpus = Corpus(sample_sources())
    indices = per_modality_indices(corpus, PER_MODALITY, seed=0)
    images = torch.stack([EvalTransform(32)(corpus.load(i)) for i in indices])
    expert = module.route(images)[1]["projector"].expert
    counts = np.zeros((3, 4), dtype=np.int64)
    np.add.at(counts, (expert.numpy(), [corpus.modality(i) for i in indices]), 1)
    routing = summary["routing"]
    assert routing["counts"] == counts.tolist()
    assert routing["images"] == 48
    assert routing["nmi"] == pytest.approx(normalized_mutual_info(counts))
    assert routing["purity"] == pytest.approx(purity(counts))

    # loss curves: the final values are the last ones logged in the run's metrics.csv
    with open(next((run_dir / "logs").rglob("metrics.csv")), newline="") as fh:
        rows = list(csv.DictReader(fh))
    last_cst = [float(r["train/l_cst"]) for r in rows if r.get("train/l_cst")][-1]
    assert summary["loss_curves"]["final_l_cst"] == pytest.approx(last_cst)
    assert summary["skipped"] == {"classifier": "no --classifier given"}


def test_routing_heatmap_and_confusion_figure_sizes(tmp_path):
    fig = routing_heatmap(np.array([[5, 0], [1, 4], [0, 0], [2, 2], [0, 9]]), ["xray", "oct"])
    check_png(save_figure(fig, tmp_path / "h.png"), (420, 455))  # max(4, 4.2) x max(3, 4.55) in
    cm = confusion_counts(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    check_png(save_figure(confusion_figure(cm, ["a", "b", "c"]), tmp_path / "c.png"), (450, 450))
    with pytest.raises(ValueError, match="class ids"):
        confusion_counts(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="modality names"):
        routing_heatmap(np.ones((2, 3)), ["a", "b"])


def test_read_metrics_and_smoothing(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/l_cst,train/l_route\n0,0,4.0,\n0,0,,9.0\n0,1,3.0,8.0\n0,2,2.0,\n")
    series = read_metrics([path])
    assert series["train/l_cst"][0].tolist() == [0, 1, 2]
    assert series["train/l_cst"][1].tolist() == [4.0, 3.0, 2.0]
    assert series["train/l_route"][1].tolist() == [9.0, 8.0]
    assert smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


class ToyBackbone(torch.nn.Module):
    """One identity 'stage' (NCHW) then global average pooling: the Grad-CAM of the pooled
    channel-0 score is the positive part of input channel 0, up to scale."""

    output_fmt = "NCHW"

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


def test_grad_cam_equals_the_hand_computation():
    x = torch.randn(2, 3, 8, 8)
    cams = grad_cam(ToyBackbone(), x, lambda pooled: pooled[:, 0])
    # alpha = (1/64, 0, 0): CAM = ReLU(x_0 / 64), scaled to max 1
    expected = x[:, 0].clamp_min(0)
    expected = expected / expected.flatten(1).max(dim=1).values.view(-1, 1, 1)
    np.testing.assert_allclose(cams, expected.numpy(), atol=1e-6)
    # a negative score direction has no positive evidence where x_0 > 0 and flips the map
    flipped = grad_cam(ToyBackbone(), x, lambda pooled: -pooled[:, 0])
    assert np.all(flipped[expected.numpy() > 0] == 0)


def test_grad_cam_on_swin_reads_the_nhwc_stage_map(run_dir, tmp_path):
    module = load_pretrain_module(run_dir / "checkpoints" / "last.ckpt")
    backbone = module.teacher["backbone"]
    images = torch.stack([EvalTransform(64)(np.asarray(Image.open(p).convert("RGB")))
                          for p in sorted((SAMPLE_DATA / "oct").rglob("*.png"))[:3]])
    x = module.normalize(images)
    score = lambda pooled: pooled.norm(dim=-1)  # noqa: E731
    cams = grad_cam(backbone, x, score, stage=-2)
    assert cams.shape == (3, 64, 64) and cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    # hand Grad-CAM on the same stage: NHWC activation, channel weights = spatial mean gradient
    store = []
    handle = backbone.layers[-2].register_forward_hook(lambda m, i, o: store.append(o))
    xr = x.clone().requires_grad_(True)
    s = score(backbone(xr)).sum()
    handle.remove()
    (g,) = torch.autograd.grad(s, store[0])
    a = store[0].permute(0, 3, 1, 2)
    cam = torch.relu((g.permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(dim=1).values.view(-1, 1, 1)
    np.testing.assert_allclose(cams, cam.detach().numpy(), atol=1e-5)
    check_png(save_figure(gradcam_figure(images.numpy(), cams, ["a", "b", "c"], "t"), tmp_path / "g.png"),
              (570, 420))
    with pytest.raises(ValueError, match="stage"):
        grad_cam(backbone, x, score, stage=7)


def test_analyze_confusion_matrix_of_a_fine_tuned_classifier(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(SAMPLE_DATA.parent)
    config = tmp_path / "classify.yaml"
    config.write_text(
        "seed_everything: 0\n"
        f"trainer: {{accelerator: cpu, devices: 1, max_steps: 3, logger: false, enable_checkpointing: false,\n"
        f"  default_root_dir: {tmp_path},\n"  # LightningCLI writes config.yaml there, not in the repo
        "  enable_progress_bar: false, enable_model_summary: false, num_sanity_val_steps: 0}\n"
        "model:\n  class_path: midol.tasks.ClassificationModule\n"
        f"  init_args: {{init_checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}, num_classes: 2, linear_probe: true, lr: 0.05}}\n"
        "data:\n  class_path: midol.data.LabelledDataModule\n"
        "  init_args: {train: {path: sample_data/xray}, test_fraction: 0.25, image_size: 32, batch_size: 8,\n"
        "    num_workers: 0}\n"
    )
    cli = run_lightning(["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = tmp_path / "classifier.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    # predictions of the trained model, computed here independently of the tool
    cli.model.eval()
    targets, preds = [], []
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            preds.append(cli.model(batch["image"]).argmax(dim=-1))
            targets.append(batch["target"])
    expected = confusion_counts(torch.cat(targets).numpy(), torch.cat(preds).numpy(), 2)

    out = tmp_path / "analysis"
    assert main(["analyze", str(run_dir / "checkpoints" / "last.ckpt"), "--data",
                 str(data_config(tmp_path / "data.yaml")), "--out", str(out), "--per-modality", "6",
                 "--embedding", "pca", "--gradcam-per-modality", "1", "--classifier-config", str(config),
                 "--classifier", str(ckpt), "--no-progress"]) == 0
    summary = json.loads((out / "analysis.json").read_text())
    classifier = summary["classifier"]
    assert classifier["counts"] == expected.tolist()
    n_test = len(cli.datamodule.datasets["test"])
    assert classifier["images"] == expected.sum() == n_test and 14 <= n_test <= 16  # 25 % of 60
    assert classifier["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert classifier["accuracy"] == pytest.approx(np.trace(expected) / n_test)
    check_png(out / "confusion_matrix.png", (450, 450))
    check_png(out / "gradcam_classifier.png", (400, 420))  # 2 images: max(3.8, 4) x 4.2 in
    check_png(out / "gradcam.png", (760, 420))  # 4 modalities x 1 image


def test_embedding_methods_and_the_missing_umap_error():
    from midol.analysis.tsne import embed_2d

    rng = np.random.default_rng(0)
    # two well-separated clusters stay separated in every 2-D embedding
    x = np.concatenate([rng.normal(0, 1, (20, 16)), rng.normal(12, 1, (20, 16))])
    for method in ("tsne", "pca"):
        points = embed_2d(x, method, seed=0, perplexity=5, threads=1)
        assert points.shape == (40, 2) and np.isfinite(points).all()
        a, b = points[:20].mean(axis=0), points[20:].mean(axis=0)
        spread = max(points[:20].std(axis=0).max(), points[20:].std(axis=0).max())
        assert np.linalg.norm(a - b) > 3 * spread
    with pytest.raises(ValueError, match="N >= 5"):
        embed_2d(x[:3], "tsne")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="umap-learn"):
            embed_2d(x, "umap")
