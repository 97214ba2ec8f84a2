"""Segmentation metrics and loss: midol's own against MONAI's, on real masks.

Inputs (the shared data, ../shared/data): PH2 dermoscopy lesion masks (60) and DRIVE test vessel
masks (20, pixels outside the field of view set to the ignore value 255). The predictions are
real, simple segmentations of the real images (no network): PH2 - Otsu's threshold of the grey
image (lesions are dark); DRIVE - Otsu's threshold of the green channel's black-hat (vessels
are thin and dark). Compared, single-threaded:

* Dice per image (midol's ``DicePerImage`` as of commit a30a328, restated below as
  ``former_dice_per_image`` since midol's class now calls MONAI) vs MONAI ``DiceMetric(include_background=False,
  ignore_empty=False, ignore_index=255)``;
* HD95 (midol has none before this measurement) from MONAI ``HausdorffDistanceMetric``
  (``percentile=95``) vs a plain restatement with scipy's Euclidean distance transform;
* Dice + CE loss (midol ``soft_dice_loss`` + ``F.cross_entropy``) vs MONAI ``DiceCELoss``.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/seg_metrics.py
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import best_time, load_average, need_shared_data  # noqa: E402
from midol.tasks.segmentation import soft_dice_loss  # noqa: E402

IGNORE = 255


def ph2(root: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """PH2: (targets, predictions, grey images) as H x W arrays (0/1 label maps, uint8 grey)."""
    targets, preds, greys = [], [], []
    with open(root / "dermoscopy/ph2_lesion/labels.csv") as fh:
        for row in csv.DictReader(fh):
            rgb = np.asarray(Image.open(root / "dermoscopy/ph2_lesion" / row["image"]).convert("RGB"))
            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            _, lesion = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
            mask = np.asarray(Image.open(root / "dermoscopy/ph2_lesion" / row["mask"])) > 127
            targets.append(mask.astype(np.int64))
            preds.append(lesion.astype(np.int64))
            greys.append(grey)
    return targets, preds, greys


def drive(root: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """DRIVE test: (targets with 255 outside the field of view, predictions)."""
    targets, preds = [], []
    base = root / "fundus/drive_vessel_seg"
    with open(base / "pairs.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    for row in rows:
        green = np.asarray(Image.open(base / row["image"]).convert("RGB"))[..., 1]
        hat = cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, kernel)
        _, vessel = cv2.threshold(hat, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        fov = np.asarray(Image.open(base / row["fov_mask"])) > 127
        mask = (np.asarray(Image.open(base / row["mask"])) > 127).astype(np.int64)
        mask[~fov] = IGNORE
        targets.append(mask)
        preds.append(vessel.astype(np.int64))
    return targets, preds


def former_dice_per_image(preds: torch.Tensor, target: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """midol's former ``DicePerImage.update``: B x C per-image Dice, one vectorised pass
    (empty ground truth: 1 if the prediction is empty too, else 0)."""
    valid = target != IGNORE
    classes = torch.arange(num_classes, device=preds.device).view(1, -1, 1)
    p = (preds.flatten(1).unsqueeze(1) == classes) & valid.flatten(1).unsqueeze(1)
    t = (target.flatten(1).unsqueeze(1) == classes) & valid.flatten(1).unsqueeze(1)
    inter = (p & t).sum(-1).double()
    size = p.sum(-1).double() + t.sum(-1).double()
    empty_gt = t.sum(-1) == 0
    return torch.where(empty_gt, (p.sum(-1) == 0).double(), 2 * inter / size.clamp_min(1))


def midol_dice_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image foreground Dice, B values, one image at a time (as a batch of 1 in val)."""
    return torch.cat([former_dice_per_image(p[None], t[None])[:, 1] for p, t in zip(preds, target)]).float()


def midol_dice_batched(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The former code as validation ran it: one update for the whole batch, the mean."""
    return former_dice_per_image(preds, target)[:, 1].mean()


def monai_dice_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False,
                        num_classes=2, ignore_index=IGNORE)
    return metric(preds[:, None], target[:, None])[:, 0]


def one_hot_valid(labels: torch.Tensor) -> torch.Tensor:
    """B x H x W labels -> B x 2 x H x W one-hot, all-zero at ignored pixels."""
    valid = labels != IGNORE
    onehot = F.one_hot(labels.masked_fill(~valid, 0), 2).permute(0, 3, 1, 2)
    return (onehot * valid[:, None]).float()


def monai_hd95(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(one_hot_valid(preds.masked_fill(target == IGNORE, 0)),
                                          one_hot_valid(target), include_background=False,
                                          percentile=95)[:, 0]


def edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask, with a 4-neighbour outside it (the image edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def plain_hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Restatement: the 95th percentile of the distances from each boundary pixel of one mask
    to the nearest boundary pixel of the other, the larger of the two directions."""
    a, b = edges(pred.astype(bool)), edges(target.astype(bool))
    if not a.any() or not b.any():
        return float("nan")
    to_b = ndimage.distance_transform_edt(~b)
    to_a = ndimage.distance_transform_edt(~a)
    return float(max(np.percentile(to_b[a], 95), np.percentile(to_a[b], 95)))


def losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float, float]:
    """(midol loss, MONAI loss, midol fwd+bwd s, MONAI fwd+bwd s) of CE + soft Dice (smooth 1,
    foreground only, summed over the batch)."""
    from monai.losses import DiceCELoss

    monai_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                            smooth_nr=1.0, smooth_dr=1.0)

    def ours() -> float:
        x = logits.clone().requires_grad_(True)
        loss = F.cross_entropy(x, target) + soft_dice_loss(x, target, IGNORE)
        loss.backward()
        return float(loss)

    def theirs() -> float:
        x = logits.clone().requires_grad_(True)
        loss = monai_loss(x, target[:, None])
        loss.backward()
        return float(loss)

    t_ours, v_ours = best_time(ours)
    t_theirs, v_theirs = best_time(theirs)
    return v_ours, v_theirs, t_ours, t_theirs


def main() -> int:
    torch.set_num_threads(1)
    root = need_shared_data()
    results: dict[str, object] = {"load_before": load_average()}
    ph2_t, ph2_p, greys = ph2(root)
    drive_t, drive_p = drive(root)
    for name, targets, preds in (("PH2", ph2_t, ph2_p), ("DRIVE", drive_t, drive_p)):
        # one size per set (PH2 varies by a few pixels): crop to the smallest
        h = min(t.shape[0] for t in targets)
        w = min(t.shape[1] for t in targets)
        t = torch.from_numpy(np.stack([x[:h, :w] for x in targets]))
        p = torch.from_numpy(np.stack([x[:h, :w] for x in preds]))
        t_mid, d_mid = best_time(lambda: midol_dice_per_image(p, t))  # noqa: B023
        t_mon, d_mon = best_time(lambda: monai_dice_per_image(p, t))  # noqa: B023
        t_batch, d_batch = best_time(lambda: midol_dice_batched(p, t))  # noqa: B023
        t_hd, hd = best_time(lambda: monai_hd95(p, t), repeats=1)  # noqa: B023
        # at the fine-tuning size (224 x 224, nearest-neighbour), the cost per validation image
        p224 = F.interpolate(p[:, None].float(), size=(224, 224), mode="nearest")[:, 0].long()
        t224 = F.interpolate(t[:, None].float(), size=(224, 224), mode="nearest")[:, 0].long()
        t_hd224, _ = best_time(lambda: monai_hd95(p224, t224))  # noqa: B023
        v224 = (t224 != IGNORE).numpy()
        t_plain224, _ = best_time(lambda: [plain_hd95(a * v, b * v) for a, b, v in  # noqa: B023
                                           zip(p224.numpy(), t224.numpy(), v224)])  # noqa: B023
        valid = (t != IGNORE).numpy()
        t_plain, plain = best_time(lambda: [plain_hd95(a * v, b * v) for a, b, v in  # noqa: B023
                                            zip(p.numpy(), t.numpy(), valid)], repeats=1)  # noqa: B023
        plain_t = torch.tensor(plain, dtype=torch.float32)
        results[name] = {
            "images": int(t.shape[0]), "size": [h, w],
            "dice_midol_mean": float(d_mid.mean()), "dice_monai_mean": float(d_mon.mean()),
            "dice_max_abs_diff": float((d_mid - d_mon.double().float()).abs().max()),
            "dice_midol_s": t_mid, "dice_monai_s": t_mon, "dice_midol_batched_s": t_batch,
            "dice_midol_batched_mean": float(d_batch),
            "hd95_monai_224_s": t_hd224, "hd95_plain_224_s": t_plain224,
            "hd95_monai_mean": float(hd.nanmean()), "hd95_plain_mean": float(plain_t.nanmean()),
            "hd95_max_abs_diff": float((hd - plain_t).abs().nan_to_num(0).max()),
            "hd95_nan_same": bool(torch.equal(hd.isnan(), plain_t.isnan())),
            "hd95_monai_s": t_hd, "hd95_plain_s": t_plain,
        }
    # the loss on PH2 at 256 x 256: logits from the grey level around the image's Otsu threshold
    logits_l, target_l = [], []
    for grey, target in zip(greys[:8], ph2_t[:8]):
        g = torch.from_numpy(cv2.resize(grey, (256, 256), interpolation=cv2.INTER_AREA)).float()
        thr, _ = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        lesion = (thr - g) / 20.0
        logits_l.append(torch.stack([torch.zeros_like(lesion), lesion]))
        m = cv2.resize(target.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        target_l.append(torch.from_numpy(m).long())
    v_ours, v_theirs, t_ours, t_theirs = losses(torch.stack(logits_l), torch.stack(target_l))
    results["loss"] = {"batch": [8, 2, 256, 256], "midol": v_ours, "monai": v_theirs,
                       "abs_diff": abs(v_ours - v_theirs), "midol_s": t_ours, "monai_s": t_theirs}
    results["load_after"] = load_average()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
