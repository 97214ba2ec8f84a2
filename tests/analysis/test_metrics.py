"""Routing metrics (NMI, purity, entropies) against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from midol.utils.cluster_metrics import (
    distribution_stats,
    entropy,
    mean_pairwise_cosine,
    modality_coverage,
    mutual_information,
    normalized_entropy,
    normalized_mutual_info,
    purity,
    routing_report,
)

# 2 experts x 2 modalities: expert 0 holds 3 images of modality 0 and 1 of modality 1,
# expert 1 holds 2 images of modality 1 (6 images).
TABLE = [[3, 1], [0, 2]]


def test_nmi_of_a_small_table_equals_the_hand_computation():
    ln = math.log
    # joint p(e, m) = [[1/2, 1/6], [0, 1/3]]; p(e) = (2/3, 1/3); p(m) = (1/2, 1/2)
    mi = 0.5 * ln(0.5 / (2 / 3 * 0.5)) + (1 / 6) * ln((1 / 6) / (2 / 3 * 0.5)) + (1 / 3) * ln((1 / 3) / (1 / 3 * 0.5))
    h_e = -(2 / 3 * ln(2 / 3) + 1 / 3 * ln(1 / 3))
    h_m = ln(2)
    assert mi == pytest.approx(0.3182571, abs=1e-6)
    assert mutual_information(TABLE) == pytest.approx(mi, rel=1e-12)
    assert entropy([4, 2]) == pytest.approx(h_e, rel=1e-12)
    assert normalized_mutual_info(TABLE) == pytest.approx(mi / ((h_e + h_m) / 2), rel=1e-12)
    assert normalized_mutual_info(TABLE) == pytest.approx(0.4787046, abs=1e-6)


def test_purity_and_coverage_of_a_small_table():
    assert purity(TABLE) == pytest.approx(5 / 6)  # majorities: 3 (expert 0) + 2 (expert 1)
    assert modality_coverage(TABLE) == pytest.approx(5 / 6)  # 3 (modality 0) + 2 (modality 1)
    # 3 experts x 2 modalities, expert 2 mixed 2/2
    table = [[5, 0], [0, 4], [2, 2]]
    assert purity(table) == pytest.approx((5 + 4 + 2) / 13)
    assert modality_coverage(table) == pytest.approx((5 + 4) / 13)


def test_limit_cases():
    perfect = np.diag([7, 3, 5])
    assert normalized_mutual_info(perfect) == pytest.approx(1.0)
    assert purity(perfect) == 1.0
    # every image on one expert: no information about the modality
    assert normalized_mutual_info([[4, 6, 1], [0, 0, 0]]) == 0.0
    assert purity([[4, 6, 1], [0, 0, 0]]) == pytest.approx(6 / 11)
    # independent routing: expert shares equal in every modality
    assert normalized_mutual_info([[2, 4], [1, 2]]) == pytest.approx(0.0, abs=1e-12)
    # one modality and one expert used: partitions agree (scikit-learn's convention)
    assert normalized_mutual_info([[0], [9]]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        normalized_mutual_info([[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="2-D"):
        purity([1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        purity([[1, -1]])


def test_nmi_matches_scikit_learn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_exp, n_mod, n in [(2, 2, 10), (5, 5, 500), (8, 3, 200), (3, 7, 50)]:
        experts = rng.integers(0, n_exp, n)
        # correlate modalities with experts so the NMI is far from 0
        modalities = np.where(rng.random(n) < 0.6, experts % n_mod, rng.integers(0, n_mod, n))
        table = np.zeros((n_exp, n_mod), dtype=np.int64)
        np.add.at(table, (experts, modalities), 1)
        expected = metrics.normalized_mutual_info_score(modalities, experts)
        assert normalized_mutual_info(torch.from_numpy(table)) == pytest.approx(expected, abs=1e-10)
        cm = metrics.cluster.contingency_matrix(modalities, experts)
        assert purity(table) == pytest.approx(cm.max(axis=0).sum() / n)


def test_routing_report_fields():
    report = routing_report([[3, 1], [0, 2], [0, 0]], ["xray", "oct"])
    assert report["images"] == 6 and report["experts"] == 3 and report["experts_used"] == 2
    assert report["expert_load"] == pytest.approx([4 / 6, 2 / 6, 0.0])
    assert report["max_load"] == pytest.approx(4 / 6)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert report["load_entropy"] == pytest.approx(h / math.log(3))
    assert report["nmi"] == pytest.approx(normalized_mutual_info(TABLE))
    assert report["counts"] == [[3, 1], [0, 2], [0, 0]]
    assert "nmi" not in routing_report([[3], [1]])  # a single modality: no NMI
    with pytest.raises(ValueError, match="modality names"):
        routing_report(TABLE, ["xray"])
    assert normalized_entropy([1, 1, 1, 1]) == pytest.approx(1.0)
    assert normalized_entropy([0, 5, 0]) == 0.0


def test_distribution_stats_detect_both_dino_collapse_modes():
    k, b = 16, 8
    healthy = torch.nn.functional.one_hot(torch.arange(b), k).float()  # sharp and diverse
    stats = distribution_stats(healthy)
    assert float(stats["entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["batch_entropy"]) == pytest.approx(math.log(b) / math.log(k))
    assert float(stats["info"]) == pytest.approx(1.0)  # log B / log min(K, B)
    constant = torch.zeros(b, k)
    constant[:, 3] = 1.0
    assert float(distribution_stats(constant)["info"]) == pytest.approx(0.0, abs=1e-6)
    assert float(distribution_stats(constant)["batch_entropy"]) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((b, k), 1.0 / k)
    assert float(distribution_stats(uniform)["entropy"]) == pytest.approx(1.0)
    assert float(distribution_stats(uniform)["info"]) == pytest.approx(0.0, abs=1e-6)
    # a hand-computed mixed case: two rows, K = 2
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    h = lambda q: -sum(x * math.log(x) for x in q)  # noqa: E731
    row_h = (h([0.9, 0.1]) + h([0.5, 0.5])) / 2
    mean_h = h([0.7, 0.3])
    stats = distribution_stats(p)
    assert float(stats["entropy"]) == pytest.approx(row_h / math.log(2), rel=1e-6)
    assert float(stats["info"]) == pytest.approx((mean_h - row_h) / math.log(2), rel=1e-5)


def test_mean_pairwise_cosine():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    c = 1 / math.sqrt(2)
    assert float(mean_pairwise_cosine(x)) == pytest.approx((0 + c + c) / 3, rel=1e-6)
    assert float(mean_pairwise_cosine(torch.ones(5, 4))) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.ones(1, 4))
