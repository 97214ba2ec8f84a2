"""WeightedSourceSampler: determinism, permutations, weighted shares."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from midol.data.pretrain import Corpus
from midol.data.sampler import WeightedSourceSampler
from midol.data.sources import DataSource


@pytest.fixture(scope="module")
def corpus(sample_data: Path) -> Corpus:
    # Real source sizes: 60 X-rays, 41 tiles, 16 OCT, 200 fundus rows.
    return Corpus(
        [
            DataSource(str(sample_data / "xray"), "xray"),
            DataSource(str(sample_data / "pathology"), "pathology"),
            DataSource(str(sample_data / "oct"), "oct"),
            DataSource(str(sample_data / "fundus_retinamnist.npz"), "fundus"),
        ]
    )


def test_deterministic_per_seed_and_epoch(corpus: Corpus) -> None:
    a = WeightedSourceSampler(corpus.source_ids, [1, 1, 1, 1], seed=3)
    b = WeightedSourceSampler(corpus.source_ids, [1, 1, 1, 1], seed=3)
    assert list(a) == list(b) == list(a)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(WeightedSourceSampler(corpus.source_ids, [1, 1, 1, 1], seed=4)) != first


def test_equal_weights_is_a_permutation(corpus: Corpus) -> None:
    n = len(corpus)
    s = WeightedSourceSampler(corpus.source_ids, [2.0] * 4, seed=0)
    order = list(s)
    assert len(s) == n and sorted(order) == list(range(n)) and order != list(range(n))
    longer = list(WeightedSourceSampler(corpus.source_ids, [1.0] * 4, num_samples=2 * n + 5))
    counts = Counter(longer)
    assert len(longer) == 2 * n + 5 and set(counts) == set(range(n))
    assert set(counts.values()) <= {2, 3}


def test_unequal_weights_are_per_image_rates(corpus: Corpus) -> None:
    weights = [1.0, 1.0, 2.0, 4.0]
    sizes = Counter(corpus.source_ids.tolist())
    mass = [w * sizes[k] for k, w in enumerate(weights)]
    expected = [m / sum(mass) for m in mass]
    s = WeightedSourceSampler(corpus.source_ids, weights, num_samples=20000, seed=0)
    assert s.expected_shares() == pytest.approx(expected)
    draws = list(s)
    per_source = Counter(int(corpus.source_ids[i]) for i in draws)
    for k in range(4):
        # binomial standard deviation at 20000 draws is below 0.0035
        assert abs(per_source[k] / 20000 - expected[k]) < 0.012
    # Items within the small OCT source (16 items, ~1700 draws) are drawn roughly uniformly.
    oct_counts = Counter(i for i in draws if int(corpus.source_ids[i]) == 2)
    assert len(oct_counts) == 16 and max(oct_counts.values()) < 2 * min(oct_counts.values())


def test_nearly_equal_weights_give_nearly_the_natural_mix(corpus: Corpus) -> None:
    """No jump between equal and almost-equal weights."""
    natural = WeightedSourceSampler(corpus.source_ids, [1.0] * 4).expected_shares()
    nudged = WeightedSourceSampler(corpus.source_ids, [1.0, 1.0, 1.0, 1.0001]).expected_shares()
    assert nudged == pytest.approx(natural, abs=1e-4)


def test_invalid_arguments() -> None:
    ids = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="> 0"):
        WeightedSourceSampler(ids, [1.0, 0.0])
    with pytest.raises(ValueError, match="source ids"):
        WeightedSourceSampler(ids, [1.0])
    with pytest.raises(ValueError, match="num_samples"):
        WeightedSourceSampler(ids, [1.0, 1.0], num_samples=0)
