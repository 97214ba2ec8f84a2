"""Missing-input protocols of MedMIX as pure functions over a presence mask.

The protocols are the paper's (Cho, Qiu, Li 2026, arXiv 2605.16639, figures: train-time
one-modality drop, train-time multi-random drop, test-time drop-rate sweep); their exact form
and the not-at-random pattern (a referee's objection) are midol's design, see
``docs/papers/medmix.md``, 'Missingness protocols'. A mask is N x M bool (patients x inputs,
True = present); every function returns a new mask, a subset of the given one, and never
leaves a patient without an input.
Randomness comes only from the ``torch.Generator`` passed in, so a seed fixes the patients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_SWEEP_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def _check_mask(present: torch.Tensor) -> None:
    if present.dtype != torch.bool or present.ndim != 2:
        raise ValueError(f"present must be an N x M bool tensor, got {present.dtype} "
                         f"{tuple(present.shape)}")
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"{int(empty.sum())} patient(s) have no present input to begin with")


def _check_rate(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {p}")


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _threshold_drop(present: torch.Tensor, u: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Drop entry (n, m) when ``u[n, m] < p``; a patient left with nothing gets back its
    present input of largest ``u`` (with i.i.d. uniform ``u``, a uniform pick among them).

    For a fixed ``u`` the masks are nested: a larger ``p`` keeps a subset of what a smaller one
    keeps (the rescued input, when kept at the smaller rate, is never dropped before the others).
    """
    keep = present & (u >= p)
    best = torch.where(present, u, torch.full_like(u, -1.0)).argmax(dim=1)
    rescue = torch.nn.functional.one_hot(best, present.shape[1]).bool()
    return torch.where(keep.any(dim=1, keepdim=True), keep, rescue)


def random_drop(present: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Train-time multi-random drop: each present input is dropped with probability ``p``
    (independently); a patient left with none gets back one of its originally present inputs,
    chosen uniformly at random.

    The expected drop rate of an input present for a patient with ``k`` present inputs is
    therefore ``p - p**k / k``, not exactly ``p``.
    """
    _check_mask(present)
    _check_rate("p", p)
    return _threshold_drop(present, _uniform(present.shape, generator, present.device), p)


def drop_input(present: torch.Tensor, index: int) -> torch.Tensor:
    """Train-time one-input drop: input ``index`` is never present.

    Raises ``ValueError`` when some patients had only that input: exclude them first (they
    have nothing left to predict from).
    """
    _check_mask(present)
    if not 0 <= index < present.shape[1]:
        raise ValueError(f"index must lie in [0, {present.shape[1]}), got {index}")
    out = present.clone()
    out[:, index] = False
    empty = ~out.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"dropping input {index} leaves {int(empty.sum())} patient(s) with no "
                         "input; exclude them before this protocol")
    return out


def not_at_random_drop(
    present: torch.Tensor,
    labels_positive: torch.Tensor,
    p_pos: float,
    p_neg: float,
    generator: torch.Generator,
    input_index: int,
) -> torch.Tensor:
    """Structured (not-at-random) missingness: input ``input_index`` is dropped with
    probability ``p_pos`` for positive patients and ``p_neg`` for the others (midol's design,
    answering the referee that clinical missingness depends on the patient).

    Other inputs are untouched. A patient whose only present input is ``input_index`` keeps it,
    so the rates hold among patients with another input.

    Args:
        labels_positive: N bool, e.g. "has any abnormal label".
    """
    _check_mask(present)
    _check_rate("p_pos", p_pos)
    _check_rate("p_neg", p_neg)
    if labels_positive.dtype != torch.bool or labels_positive.shape != present.shape[:1]:
        raise ValueError(f"labels_positive must be bool of shape {tuple(present.shape[:1])}")
    if not 0 <= input_index < present.shape[1]:
        raise ValueError(f"input_index must lie in [0, {present.shape[1]}), got {input_index}")
    u = _uniform(present.shape[:1], generator, present.device)
    rate = torch.where(labels_positive.to(present.device), p_pos, p_neg)
    others = present.clone()
    others[:, input_index] = False
    drop = (u < rate) & others.any(dim=1)
    out = present.clone()
    out[:, input_index] &= ~drop
    return out


def sweep_masks(
    present: torch.Tensor, rates: Sequence[float] = DEFAULT_SWEEP_RATES, seed: int = 0
) -> list[torch.Tensor]:
    """Test-time drop-rate sweep: one mask per rate, ``random_drop`` at that rate.

    One uniform draw from ``seed`` serves every rate, so the masks are identical across calls
    (the same patients dropped for every model) and nested: a higher rate drops a superset of
    what a lower rate drops. ``sweep_masks(x, rates, s)[i]`` equals
    ``random_drop(x, rates[i], torch.Generator().manual_seed(s))``.
    """
    _check_mask(present)
    for q in rates:
        _check_rate("rate", q)
    generator = torch.Generator().manual_seed(seed)
    u = _uniform(present.shape, generator, present.device)
    return [_threshold_drop(present, u, q) for q in rates]


def positive_patients(targets: np.ndarray, label_names: Sequence[str], negative: Sequence[str]) -> np.ndarray:
    """Patients with a label (multi-label) or class (multi-class) outside ``negative``."""
    keep = [i for i, name in enumerate(label_names) if name not in set(negative)]
    if targets.ndim == 2:
        return np.asarray(targets[:, keep].sum(axis=1) > 0)
    return np.isin(targets, keep)


def balancing_drop_rates(available: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``q[s, m]``: the probability of dropping input ``m`` of a patient of stratum ``s`` (0
    negative, 1 positive) who has it, so that ``m`` is then missing equally often in both strata
    (as often as in the stratum where it is missing most), in expectation.

    A counter-measure to labels that predict missingness (ODIR: one-eyed patients are mostly
    abnormal): with absence independent of the label in training, a fusion model cannot learn
    "missing means sick" (issue 26)."""
    _check_mask(available)
    positive = positive.bool()
    rates = []
    for stratum in (~positive, positive):
        if not bool(stratum.any()):
            rates.append(torch.zeros(available.shape[1], dtype=torch.float64))
        else:
            rates.append(1.0 - available[stratum].double().mean(dim=0))
    absent = torch.stack(rates)  # 2 x M natural absence rates
    target = absent.max(dim=0).values
    q = (target - absent) / (1.0 - absent).clamp_min(1e-12)
    return q.clamp(0.0, 1.0).float()


def balanced_drop(present: torch.Tensor, rates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Drop entry (n, m) with probability ``rates[n, m]`` (a patient left with nothing gets one
    input back, as in :func:`random_drop`)."""
    _check_mask(present)
    if rates.shape != present.shape:
        raise ValueError(f"rates must have the mask's shape {tuple(present.shape)}, got {tuple(rates.shape)}")
    return _threshold_drop(present, _uniform(present.shape, generator, present.device), rates.to(present.device))
