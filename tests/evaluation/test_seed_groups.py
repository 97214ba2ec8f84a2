"""Rows of several pre-training seeds: the two-level bootstrap (seeds and test samples) and
``midol eval --pretrain_groups`` on real sample images."""

from __future__ import annotations

import json

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from midol.cli import main
from midol.evaluation import stats
from tests.helpers.eval_suites import FAST, two_task_suite


def _scores(rng: np.random.Generator, y: np.ndarray, signal: float) -> np.ndarray:
    logit = signal * (2 * y - 1) + rng.normal(size=len(y))
    p = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p, p], axis=1)


def test_seed_resamples_and_single_seed_reduces_to_the_plain_bootstrap():
    idx = stats.seed_resamples(5, 300, seed=0)
    assert idx.shape == (300, 5) and idx.min() == 0 and idx.max() == 4
    assert np.array_equal(idx, stats.seed_resamples(5, 300, seed=0))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    w = stats.bootstrap_weights(200, 300, seed=0, strata=y)
    a, b = [_scores(rng, y, 1.0)], [_scores(rng, y, 0.5)]
    one = stats.paired_seeds(y, [a], [b], "binary", w, stats.seed_resamples(1, 300), ["auc"])["auc"]
    plain = stats.paired_bootstrap(y, a, b, "binary", w, ["auc"])["auc"]
    assert one[0] == plain[0] and np.array_equal(one[1], plain[1])


def test_two_level_bootstrap_widens_with_seed_spread_and_finds_a_planted_gain():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    w = stats.bootstrap_weights(300, 1000, seed=0, strata=y)
    idx = stats.seed_resamples(5, 1000, seed=0)
    ref = [[_scores(rng, y, 0.6)] for _ in range(5)]
    # a row whose seeds vary a lot: the mean over seeds is pinned but the seed spread is wide
    spread = [[_scores(rng, y, s)] for s in (0.2, 0.4, 0.6, 1.0, 1.4)]
    gain = [[_scores(rng, y, 1.6)] for _ in range(5)]
    point, boot = stats.paired_seeds(y, gain, ref, "binary", w, idx, ["auc"])["auc"]
    c = stats.compare(point, boot, "auc")
    assert c.verdict == "better" and c.p < 0.01
    s_spread = stats.summarize_seeds(y, spread, "binary", w, idx, ["auc"])["auc"]
    s_flat = stats.summarize_seeds(y, gain, "binary", w, idx, ["auc"])["auc"]
    assert s_spread.sd > 3 * s_flat.sd
    assert (s_spread.hi - s_spread.lo) > (s_flat.hi - s_flat.lo)
    # the mean over seeds of each seed's value
    per_seed = [stats.summarize(y, m, "binary", None, ["auc"])["auc"].mean for m in spread]
    assert abs(s_spread.mean - float(np.mean(per_seed))) < 1e-12
    same = stats.paired_seeds(y, ref, ref, "binary", w, idx, ["auc"])["auc"]
    assert same[0] == 0.0 and stats.compare(*same, "auc").verdict == "not distinguishable"


def test_pretrain_groups_pair_seeds_with_seeded_random_references(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(100 + seed)
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        path = tmp_path / f"v{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(path)
    spec = "timm:vit_tiny_patch16_224,img_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2@"
    suite, out = two_task_suite(tmp_path), tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--out", str(out), "--cache_dir", str(tmp_path / "c"),
                 *FAST, "--protocols", "knn,linear", "--pretrain_groups", "true", "--backbones",
                 f"v@0={spec}{paths[0]}", f"v@1={spec}{paths[1]}"]) == 0
    report = json.loads((out / "report.json").read_text())
    labels = [b["label"] for b in report["provenance"]["backbones"]]
    assert labels == ["v@0", "v@1", "random:vit_tiny_patch16_224@0", "random:vit_tiny_patch16_224@1"]
    assert {r["key"] for r in report["rows"]} == {"v [cls]", "v [avg]", "random:vit_tiny_patch16_224 [cls]",
                                                  "random:vit_tiny_patch16_224 [avg]"}
    vs_random = [c for c in report["comparisons"] if c["kind"] == "random init" and c["task"] != "(suite)"]
    assert vs_random and all(c["seeds"] == 2 for c in vs_random)
    summary = next(s for s in report["summaries"] if s["row"] == "v [cls]" and s["metric"] == "auc"
                   and s["setting"] == "linear full" and s["task"] == "xray")
    assert summary["n_draws"] == 2  # one draw per seed, two seeds


def test_rows_pair_on_the_seeds_they_share_and_never_across_seeds():
    from midol.evaluation.runner import Row, _paired_members

    a = Row("a", "pool", "x", False, False, ("a@0", "a@4"), ("0", "4"))
    b = Row("b", "pool", "x", False, False, ("b@4",), ("4",))
    c = Row("c", "pool", "x", False, False, ("c@1",), ("1",))
    single = Row("s", "pool", "x", False, False, ("s",), ("",))
    sa, sb, sc, ss = [["a0"], ["a4"]], [["b4"]], [["c1"]], [["s"]]
    assert _paired_members(a, b, sa, sb) == ([["a4"]], [["b4"]])  # seed 4 only
    assert _paired_members(a, c, sa, sc) == ([], [])  # no shared seed: no comparison
    assert _paired_members(a, single, sa, ss) == (sa, [["s"], ["s"]])  # one backbone: each seed
