"""MedMIX missing-input protocols: each drops what it says, on seeded runs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from midol.data.missingness import (
    DEFAULT_SWEEP_RATES,
    drop_input,
    not_at_random_drop,
    random_drop,
    sweep_masks,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_random_drop_rate_subset_and_one_kept() -> None:
    n, m, p = 20000, 3, 0.3
    present = torch.ones(n, m, dtype=torch.bool)
    out = random_drop(present, p, seeded(0))
    assert bool(out.any(1).all())
    # per entry, P(drop) = p - p^M / M (a patient that lost all M gets one back)
    assert within_binomial(int((~out).sum()), n * m, p - p**m / m)
    for col in range(m):
        assert within_binomial(int((~out[:, col]).sum()), n, p - p**m / m)
    assert torch.equal(out, random_drop(present, p, seeded(0)))
    assert not torch.equal(out, random_drop(present, p, seeded(1)))


def test_random_drop_never_adds_inputs_and_rescues_uniformly() -> None:
    g = seeded(5)
    present = torch.rand(3000, 4, generator=g) > 0.5
    present[~present.any(1), 0] = True
    out = random_drop(present, 0.5, seeded(6))
    assert not bool((out & ~present).any())
    assert bool(out.any(1).all())
    # p = 1: exactly one input per patient, a uniform pick among its present ones
    full = torch.ones(9000, 3, dtype=torch.bool)
    one = random_drop(full, 1.0, seeded(7))
    assert torch.equal(one.sum(1), torch.ones(9000, dtype=torch.long))
    for col in range(3):
        assert within_binomial(int(one[:, col].sum()), 9000, 1 / 3)
    only_first = torch.tensor([[True, False, False]])
    assert torch.equal(random_drop(only_first, 1.0, seeded(8)), only_first)
    assert torch.equal(random_drop(present, 0.0, seeded(9)), present)


def test_drop_input_is_exact() -> None:
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    out = drop_input(present, 1)
    assert torch.equal(out, torch.tensor([[True, False, True], [True, False, True],
                                          [False, False, True]]))
    with pytest.raises(ValueError, match="no input"):
        drop_input(torch.tensor([[False, True, False]]), 1)
    with pytest.raises(ValueError):
        drop_input(present, 3)


def test_not_at_random_drop_rates_for_positives_and_negatives() -> None:
    n = 20000
    present = torch.ones(n, 3, dtype=torch.bool)
    positive = torch.arange(n) % 4 == 0  # 5,000 positives
    out = not_at_random_drop(present, positive, p_pos=0.5, p_neg=0.1, generator=seeded(0),
                             input_index=1)
    assert torch.equal(out[:, [0, 2]], present[:, [0, 2]])  # other inputs untouched
    assert within_binomial(int((~out[positive, 1]).sum()), 5000, 0.5)
    assert within_binomial(int((~out[~positive, 1]).sum()), 15000, 0.1)
    # a patient whose only input is the dropped one keeps it
    alone = torch.tensor([[False, True, False]] * 50)
    kept = not_at_random_drop(alone, torch.ones(50, dtype=torch.bool), 1.0, 1.0, seeded(1), 1)
    assert torch.equal(kept, alone)
    with pytest.raises(ValueError):
        not_at_random_drop(present, positive.float(), 0.5, 0.1, seeded(0), 1)


def test_sweep_masks_reproducible_nested_and_at_rate() -> None:
    n, m = 10000, 3
    g = seeded(2)
    present = torch.rand(n, m, generator=g) > 0.2
    present[~present.any(1), 2] = True
    masks = sweep_masks(present, seed=17)
    again = sweep_masks(present, seed=17)
    assert len(masks) == len(DEFAULT_SWEEP_RATES) == 7
    for a, b in zip(masks, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(masks[3], sweep_masks(present, seed=18)[3])
    assert torch.equal(masks[0], present)
    for lower, higher in itertools.pairwise(masks):  # nested: monotone in the rate
        assert not bool((higher & ~lower).any())
        assert int(higher.sum()) < int(lower.sum())
    for q, mask in zip(DEFAULT_SWEEP_RATES, masks, strict=True):
        assert bool(mask.any(1).all()) and not bool((mask & ~present).any())
        assert torch.equal(mask, random_drop(present, q, seeded(17)))
    # all inputs present: dropped fraction q - q^M / M
    full = torch.ones(n, m, dtype=torch.bool)
    for q, mask in zip((0.2, 0.6), sweep_masks(full, (0.2, 0.6), seed=3), strict=True):
        assert within_binomial(int((~mask).sum()), n * m, q - q**m / m)


def test_balancing_rates_make_absence_independent_of_the_label() -> None:
    """Issue 26: one-eyed patients are mostly abnormal in ODIR. After the balancing drop, each
    input is missing as often for positive as for negative patients (measured on 20,000 draws)."""
    from midol.data.missingness import balanced_drop, balancing_drop_rates, positive_patients

    g = torch.Generator().manual_seed(0)
    n = 20_000
    positive = torch.rand(n, generator=g) < 0.6
    available = torch.ones(n, 2, dtype=torch.bool)
    # left input missing for 30% of positive, 5% of negative patients; right always present
    available[:, 0] = torch.rand(n, generator=g) >= torch.where(positive, 0.30, 0.05)
    rates = balancing_drop_rates(available, positive)
    # the negative stratum's left input is dropped with (0.30 - 0.05) / (1 - 0.05), the rest not
    a_pos, a_neg = absent_rate(available, positive), absent_rate(available, ~positive)
    assert a_pos == pytest.approx(0.30, abs=0.01) and a_neg == pytest.approx(0.05, abs=0.01)
    assert rates[0, 0].item() == pytest.approx((a_pos - a_neg) / (1 - a_neg), abs=1e-6)
    assert rates[1, 0].item() == 0.0 and rates[:, 1].tolist() == [0.0, 0.0]
    dropped = balanced_drop(available, rates[positive.long()], torch.Generator().manual_seed(1))
    assert absent_rate(dropped, positive) == pytest.approx(absent_rate(dropped, ~positive), abs=0.012)
    assert not bool((dropped & ~available).any())  # only drops
    labels = np.array([[1, 0], [0, 1], [0, 0]])
    assert positive_patients(labels, ["N", "D"], ["N"]).tolist() == [False, True, False]


def absent_rate(mask: torch.Tensor, rows: torch.Tensor) -> float:
    return float(1.0 - mask[rows, 0].float().mean())
