"""``midol analyze CKPT --data CONFIG --out DIR``: what a pre-trained model learned, as PNG files
plus ``analysis.json`` (paper Figs. 3a, 5, 6, 7, 8):

* ``routing_matrix.png``: expert x modality counts of the teacher router's per-image top-1,
  with NMI and purity;
* ``embedding.png``: t-SNE (or UMAP/PCA) of the pooled teacher features by modality and expert;
* ``loss_curves.png``: L_route and L_cst from the run's CSVLogger ``metrics.csv``;
* ``gradcam.png``: Grad-CAM of the first exported backbone (M-IDoL: the teacher; DEX: the director) for a few images per modality;
* ``pca_maps.png``: the first 3 principal components of the backbone's last-stage patch
  features as RGB over a few images, background thresholded away (DINOv2's demo);
* ``confusion_matrix.png`` (+ ``gradcam_classifier.png``): with ``--classifier-config`` and
  ``--classifier``, a fine-tuned classification model on its test (or val) split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from midol.analysis.features import RoutedImages, collect, per_modality_indices, routing_loader
from midol.analysis.inputs import pick_device, resolve_image_size, sources_from_config
from midol.analysis.plotting import save_figure, set_output
from midol.data.corpus import Corpus
from midol.errors import OutputFileError
from midol.io.atomic import atomic_write_text
from midol.methods.loading import method_from_checkpoint, read_checkpoint
from midol.tools.options import add_figure_options, add_trust_option
from midol.utils.cluster_metrics import normalized_mutual_info, routing_report
from midol.utils.run_logs import run_metrics_files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="midol analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a midol pre-training .ckpt")
    p.add_argument("--data", required=True, help="a midol fit config (or a data: block) naming the sources")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-modality", type=int, default=500,
                   help="images per modality for the routing matrix and the embedding (paper: 1 K and 10 K; 0 = all)")
    p.add_argument("--embedding", choices=["tsne", "umap", "pca"], default="tsne")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="CSVLogger metrics.csv file(s) of the run (default: those of the run that "
                   "wrote the checkpoint, which it records; for an older checkpoint the newest "
                   "under its run folder, with a warning)")
    p.add_argument("--smoothing", type=int, default=10, help="moving-average window of the loss curves")
    p.add_argument("--gradcam-per-modality", type=int, default=2, help="Grad-CAM images per modality (0 = none)")
    p.add_argument("--gradcam-stage", type=int, default=-1, help="backbone stage for Grad-CAM (-1 = last)")
    p.add_argument("--gradcam-score", choices=["router", "feature_norm"], default="router",
                   help="pre-trained backbone target: the top routed expert's logit, or the pooled-feature norm")
    p.add_argument("--pca-maps", "--pca_maps", dest="pca_maps", type=int, default=8,
                   help="images for pca_maps.png, taken across the modalities (0 = none)")
    p.add_argument("--pca-threshold", type=float, default=0.0,
                   help="foreground: patches scoring above this on the first principal component")
    p.add_argument("--pca-percentile", type=float, default=None,
                   help="foreground: patches above this percentile of that score (instead of --pca-threshold)")
    p.add_argument("--pca-invert", action="store_true",
                   help="foreground: the patches at or below the threshold (when it picks the background)")
    p.add_argument("--pca-no-background", action="store_true",
                   help="no thresholding: PCA colours for every patch")
    p.add_argument("--classifier-config", default=None, help="the midol fit config of a fine-tuned classifier")
    p.add_argument("--classifier", default=None, help="that classifier's .ckpt (with --classifier-config)")
    p.add_argument("--classifier-split", choices=["test", "val"], default="test")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop size (default: the checkpoint's pre-training size; a data "
                   "config that differs is named in a warning)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="image sampling and embedding seed")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for t-SNE/k-means (default 1: on a shared machine OpenMP threads "
                   "busy-wait; raise it on a dedicated one for many images)")
    p.add_argument("--no-progress", action="store_true")
    add_trust_option(p)
    add_figure_options(p)
    return p


def _check(ns: argparse.Namespace) -> None:
    if (ns.classifier is None) != (ns.classifier_config is None):
        raise ValueError("--classifier and --classifier-config go together")
    if ns.threads < 1:
        raise ValueError("--threads must be >= 1")
    if ns.pca_maps < 0:
        raise ValueError("--pca-maps must be >= 0")
    if ns.pca_percentile is not None and not 0 <= ns.pca_percentile <= 100:
        raise ValueError("--pca-percentile must lie in [0, 100]")
    if ns.per_modality < 0 or ns.gradcam_per_modality < 0 or ns.batch_size < 1 or ns.num_workers < 0:
        raise ValueError("--per-modality/--gradcam-per-modality must be >= 0, --batch-size >= 1, --num-workers >= 0")


def gradcam_images(routed: RoutedImages, per_modality: int) -> list[int]:
    """Positions (in ``routed``) of the first ``per_modality`` images of each modality."""
    picks: list[int] = []
    for k in range(len(routed.modalities)):
        picks += np.flatnonzero(routed.modality == k)[:per_modality].tolist()
    return picks


def eval_images(corpus: Corpus, routed: RoutedImages, picks: list[int], size: int) -> torch.Tensor:
    """uint8 ``B x 3 x size x size`` of the picked routed images, as evaluation sees them."""
    from midol.data.transforms.eval import EvalTransform

    transform = EvalTransform(size)
    return torch.stack([transform(corpus.load(int(routed.index[i]))) for i in picks])


def pretrained_gradcam(module: Any, corpus: Corpus, routed: RoutedImages, ns: argparse.Namespace,
                       size: int, out: Path) -> dict[str, Any]:
    from midol.analysis.gradcam import feature_norm_score, grad_cam, gradcam_figure, top_logit_score

    picks = gradcam_images(routed, ns.gradcam_per_modality)
    images = eval_images(corpus, routed, picks, size)
    router = getattr(module, "pooled_router", lambda: None)()
    use_router = ns.gradcam_score == "router" and router is not None
    score = top_logit_score(router) if use_router else feature_norm_score
    part, export = next(iter(module.export_modules().items()))
    backbone = export.module
    cams = grad_cam(backbone, module.normalize(images.to(module.device)), score, ns.gradcam_stage)
    titles = [f"{routed.modalities[routed.modality[i]]}\nexpert {routed.expert[i]}" for i in picks]
    what = "top routed expert's logit" if use_router else "pooled-feature norm"
    save_figure(gradcam_figure(images.numpy(), cams, titles, f"Grad-CAM of the {part.replace('_', ' ')} ({what})"),
                out / "gradcam.png")
    return {"file": "gradcam.png", "score": what, "stage": ns.gradcam_stage,
            "images": [routed.paths[i] for i in picks]}


def pca_images(routed: RoutedImages, count: int) -> list[int]:
    """Positions (in ``routed``) of ``count`` images taken in turn from each modality."""
    queues = [np.flatnonzero(routed.modality == k).tolist() for k in range(len(routed.modalities))]
    picks: list[int] = []
    while len(picks) < count and any(queues):
        for queue in queues:
            if queue and len(picks) < count:
                picks.append(queue.pop(0))
    return picks


def pca_map_stage(module: Any, corpus: Corpus, routed: RoutedImages, ns: argparse.Namespace,
                  size: int, out: Path) -> dict[str, Any]:
    """``pca_maps.png``: :mod:`midol.analysis.pca_maps` of the default exported backbone."""
    from midol.analysis.pca_maps import patch_features, pca_figure, pca_rgb

    picks = pca_images(routed, ns.pca_maps)
    images = eval_images(corpus, routed, picks, size)
    name, export = next(iter(module.export_modules().items()))
    feats = patch_features(export.module, module.normalize(images.to(module.device)))
    rgb, foreground = pca_rgb(feats, threshold=ns.pca_threshold, percentile=ns.pca_percentile,
                              background=not ns.pca_no_background, invert=ns.pca_invert)
    titles = [routed.modalities[routed.modality[i]] for i in picks]
    save_figure(pca_figure(images.numpy(), rgb, foreground, titles,
                           f"PCA of the {name.replace('_', ' ')} patch features"), out / "pca_maps.png")
    return {"file": "pca_maps.png", "backbone": name, "grid": list(rgb.shape[1:3]),
            "foreground_share": float(foreground.mean()), "images": [routed.paths[i] for i in picks]}


def classifier_analysis(ns: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """Instantiate the fine-tuning config, load the fine-tuned weights (strict), predict the
    split, draw the confusion matrix and a Grad-CAM of the predicted class."""
    from midol.analysis.confusion import confusion_counts, confusion_figure, predict
    from midol.analysis.gradcam import grad_cam, gradcam_figure, top_logit_score
    from midol.lightning_cli import run_lightning
    from midol.methods.loading import read_weights_file

    cli = run_lightning(["--config", ns.classifier_config, "--trainer.logger", "false",
                         "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                         "--trainer.strategy", "auto"], run=False)
    model, data = cli.model, cli.datamodule
    if not hasattr(model, "num_classes") or not hasattr(model, "head"):
        raise ValueError(f"{ns.classifier_config}: the model is not a classification module (no num_classes/head)")
    ckpt = read_weights_file(ns.classifier)
    if "state_dict" not in ckpt:
        raise ValueError(f"{ns.classifier}: no 'state_dict' (expected a Lightning checkpoint)")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{ns.classifier} does not fit the model of {ns.classifier_config}: {err}") from err
    model.to(device).eval()
    data.setup("test")
    loader = data.test_dataloader() if ns.classifier_split == "test" else data.val_dataloader()
    if not loader:
        raise ValueError(f"{ns.classifier_config}: the datamodule has no {ns.classifier_split} split")
    targets, preds = predict(model, loader, progress=not ns.no_progress)
    names = list(getattr(model, "class_names", None) or getattr(data, "classes", None)
                 or [str(i) for i in range(model.num_classes)])
    counts = confusion_counts(targets, preds, model.num_classes)
    save_figure(confusion_figure(counts, names, f"{ns.classifier_split} split"), out / "confusion_matrix.png")
    result: dict[str, Any] = {
        "file": "confusion_matrix.png", "split": ns.classifier_split, "class_names": names,
        "counts": counts.tolist(), "accuracy": float(np.trace(counts) / counts.sum()),
        "images": int(counts.sum()),
    }
    if ns.gradcam_per_modality:
        batch = next(iter(loader))
        n = min(len(batch["image"]), max(2, ns.gradcam_per_modality * 2))
        images = batch["image"][:n]
        cams = grad_cam(model.backbone, model.normalizer(images.to(device)), top_logit_score(model.head),
                        ns.gradcam_stage)
        with torch.no_grad():
            pred = model(images.to(device)).argmax(dim=-1).cpu()
        titles = [f"true {names[int(t)]}\npred {names[int(p)]}" for t, p in zip(batch["target"][:n], pred)]
        save_figure(gradcam_figure(images.numpy(), cams, titles, "Grad-CAM of the classifier (predicted class)"),
                    out / "gradcam_classifier.png")
        result["gradcam_file"] = "gradcam_classifier.png"
    return result


def embedding_stage(routed: RoutedImages, ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``embedding.png`` and, with >= 2 modalities, the k-means NMI of the teacher features
    (k = number of modalities) against the modality."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from midol.analysis.tsne import embed_2d, embedding_figure

    points = embed_2d(routed.features, ns.embedding, ns.seed, ns.perplexity, ns.threads)
    label = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}[ns.embedding]
    save_figure(embedding_figure(points, routed.modality, routed.modalities, routed.expert,
                                 routed.num_experts, label), out / "embedding.png")
    result: dict[str, Any] = {"file": "embedding.png", "method": ns.embedding, "perplexity": ns.perplexity}
    k = len(routed.modalities)
    if k >= 2:
        with threadpool_limits(limits=ns.threads):
            clusters = KMeans(k, n_init=10, random_state=ns.seed).fit_predict(routed.features)
        table = np.zeros((k, k), dtype=np.int64)
        np.add.at(table, (clusters, routed.modality), 1)
        result["kmeans_nmi"] = normalized_mutual_info(table)
    return result


def loss_curve_stage(ns: argparse.Namespace, out: Path, keys: list[str] | None = None,
                     run_files: list[Path] | None = None) -> dict[str, Any] | None:
    """``loss_curves.png`` of ``keys`` (default: M-IDoL's L_route and L_cst; a method's own
    ``summary_metrics()``) from ``--metrics``, else ``run_files``: the metrics.csv files of the
    run that wrote the checkpoint (:func:`midol.utils.run_logs.run_metrics_files`); None if none."""
    from midol.analysis.curves import DEFAULT_KEYS, loss_curves, read_metrics

    files = ns.metrics or run_files or []
    if not files:
        return None
    series = read_metrics(files)
    keys = keys or list(DEFAULT_KEYS)
    save_figure(loss_curves(series, keys, ns.smoothing), out / "loss_curves.png")
    finals = {f"final_{k.split('/')[-1]}": float(series[k][1][-1]) for k in keys if k in series}
    return {"file": "loss_curves.png", "metrics": [str(m) for m in files], **finals}


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    _check(ns)
    set_output(ns.format, ns.dpi)
    out = Path(ns.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFileError(f"--out {out}: cannot create the output folder ({err.strerror or err})") from err
    device = pick_device(ns.device)
    # the inputs first: errors before any progress bar
    checkpoint = read_checkpoint(ns.checkpoint)
    module = method_from_checkpoint(checkpoint, ns.checkpoint, device, tuple(ns.class_path))
    run_files = None if ns.metrics else run_metrics_files(ns.checkpoint, checkpoint)
    del checkpoint  # its tensors are the module's now
    sources, config_size = sources_from_config(ns.data)
    corpus = Corpus(sources)
    stages = ["teacher pass", "routing matrix", "embedding", "loss curves", "grad-cam", "pca maps",
              "classifier"]
    bar = tqdm(total=len(stages), desc="midol analyze", disable=ns.no_progress)
    summary: dict[str, Any] = {"checkpoint": str(ns.checkpoint), "data": str(ns.data), "skipped": {}}

    def done(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)

    size = resolve_image_size(ns.image_size, config_size, module)
    indices = per_modality_indices(corpus, ns.per_modality or None, ns.seed)
    loader = routing_loader(corpus, size, indices, ns.batch_size, ns.num_workers)
    routed = collect(module, loader, corpus.modalities, progress=not ns.no_progress)
    summary.update(image_size=size, images=len(routed.paths), unreadable=routed.skipped,
                   modalities=list(corpus.modalities),
                   images_per_modality={m: int((routed.modality == k).sum()) for k, m in enumerate(corpus.modalities)})
    done("teacher pass")

    from midol.analysis.heatmap import routing_heatmap

    routing_files = []
    for name in routed.routes:
        counts = routed.counts_of(name)
        report = routing_report(counts, list(corpus.modalities))
        if name == next(iter(routed.routes)):
            summary["routing"] = report
            summary["routing"]["mean_confidence"] = float(routed.confidence.mean())
        else:
            summary.setdefault("routers", {})[name] = report
        file = "routing_matrix.png" if len(routed.routes) == 1 else f"routing_matrix_{name}.png"
        save_figure(routing_heatmap(counts, list(corpus.modalities), title=f"router {name} top-1"),
                    out / file)
        routing_files.append(file)
    if not routed.routes:
        summary["skipped"]["routing_matrix"] = "the model has no router"
    done("routing matrix")

    summary["embedding"] = embedding_stage(routed, ns, out)
    done("embedding")

    curves = loss_curve_stage(ns, out, getattr(module, "summary_metrics", lambda: None)(), run_files)
    if curves is None:
        summary["skipped"]["loss_curves"] = ("no metrics.csv of the checkpoint's run (it had no "
                                             "CSVLogger?; pass --metrics)")
    else:
        summary["loss_curves"] = curves
    done("loss curves")

    if ns.gradcam_per_modality and getattr(module, "gradcam_supported", True):
        summary["gradcam"] = pretrained_gradcam(module, corpus, routed, ns, size, out)
    elif ns.gradcam_per_modality:
        summary["skipped"]["gradcam"] = f"Grad-CAM needs a spatial feature map; {type(module).__name__}'s backbone has none"
    else:
        summary["skipped"]["gradcam"] = "--gradcam-per-modality 0"
    done("grad-cam")

    if ns.pca_maps and routed.paths:
        summary["pca_maps"] = pca_map_stage(module, corpus, routed, ns, size, out)
    else:
        summary["skipped"]["pca_maps"] = "--pca-maps 0" if not ns.pca_maps else "no readable image"
    done("pca maps")

    if ns.classifier:
        summary["classifier"] = classifier_analysis(ns, device, out)
    else:
        summary["skipped"]["classifier"] = "no --classifier given"
    done("classifier")
    bar.close()

    written = routing_files + [summary[k]["file"] for k in ("embedding", "loss_curves", "gradcam",
                                                                     "pca_maps", "classifier") if k in summary]
    written += [summary["classifier"]["gradcam_file"]] if "gradcam_file" in summary.get("classifier", {}) else []
    summary["files"] = sorted(written)
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=2) + "\n")
    report = summary.get("routing")
    if report is None:
        print(f"{len(routed.paths)} images (no router)")
    else:
        nmi = f"NMI {report['nmi']:.4f}, purity {report['purity']:.4f}, " if "nmi" in report else ""
        print(f"{len(routed.paths)} images: routing {nmi}experts used {report['experts_used']}/{report['experts']}")
    for key, why in summary["skipped"].items():
        print(f"skipped {key}: {why}", file=sys.stderr)
    print(f"wrote {', '.join(summary['files'])} and analysis.json to {out}")
    return 0
