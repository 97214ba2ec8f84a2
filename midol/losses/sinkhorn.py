"""Sinkhorn-Knopp balancing of teacher routing scores (the text of M-IDoL Eq. 15,
docs/papers/m-idol.md).

The teacher's router logits are turned into a routing matrix in which every expert receives
the same share of the (global) batch. Without this balance every image collapses onto one
expert (M-IDoL Table 2, row "MoE only").
"""

from __future__ import annotations

from typing import Literal

import torch

from midol.utils.dist import all_reduce_max, all_reduce_sum, world_size

SinkhornImpl = Literal["swav", "authors"]
# The floor the M-IDoL authors' code applies to Q (so -log a_T <= -log 1e-12 ~ 27.6).
AUTHORS_FLOOR = 1e-12


def _logsumexp_over_global_batch(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over dim 0 of ``x`` (B x N) across all data-parallel ranks -> 1 x N."""
    peak = all_reduce_max(x.amax(dim=0, keepdim=True))
    mass = all_reduce_sum(torch.exp(x - peak).sum(dim=0, keepdim=True))
    return mass.log() + peak


@torch.no_grad()
def log_sinkhorn_knopp(logits: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Log of :func:`sinkhorn_knopp`, always finite.

    SwAV's ``distributed_sinkhorn`` alternates two normalisations of ``Q = exp(logits/eps)``:
    every expert's mass over the batch, then every image's mass over the experts. The constant
    factors it also applies (1/N, 1/B, the initial 1/sum Q and the final xB) cancel between
    these steps, so the same matrix is obtained by alternating a log-sum-exp over the global
    batch and a log-softmax over experts. Working in log space keeps very sharp logits (the
    default effective temperature is 0.04 x 0.05) from overflowing or dividing 0 by 0.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects B x N logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1, got {iters}")
    if eps <= 0:
        raise ValueError(f"sinkhorn_knopp needs eps > 0, got {eps}")
    # float32 even under bf16 autocast: the exponent range of bf16 is fine but its 8-bit
    # mantissa makes the balance visibly inexact. Autocast is turned off as well, so that no op
    # here is ever re-cast to bf16 by an autocast op list.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.detach().float() / eps
        for _ in range(iters):
            x = x - _logsumexp_over_global_batch(x)
            x = x.log_softmax(dim=1)
        return x


def sinkhorn_knopp(logits: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced routing probabilities (B x N, float32, rows sum to 1) from router logits.

    ``logits`` are already divided by the teacher temperature. Under ``torch.distributed``
    the batch sums are all-reduced, so each rank's rows equal those of a single process run
    on the concatenated global batch. No gradient flows through.
    """
    return log_sinkhorn_knopp(logits, eps=eps, iters=iters).exp()


@torch.no_grad()
def log_sinkhorn_knopp_authors(logits: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """log a_T as the M-IDoL authors' released code computes it (main_MoE_Uni.py,
    ``_sinkhorn_knopp`` and ``_routing_consistency_loss``, commit cacb728); restated here.

    It differs from SwAV's exact balancing (:func:`log_sinkhorn_knopp`) in two ways that
    change the result, not only its numerics: every image's logits are shifted by that
    image's maximum before ``exp`` (a per-image factor, which the per-expert normalisation
    that follows does not cancel), and ``Q`` is floored at 1e-12 after ``exp``, after each
    iteration and before the log, which caps ``-log a_T`` near 27.6. As in that code the
    total-mass normalisation uses the local batch and the per-expert sums are all-reduced.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects B x N logits, got shape {tuple(logits.shape)}")
    if iters < 1 or eps <= 0:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1 and eps > 0, got {iters}, {eps}")
    tiny = AUTHORS_FLOOR
    # float32, autocast off (as in log_sinkhorn_knopp)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.detach().float()
        x = x - x.amax(dim=1, keepdim=True)
        q = torch.exp(x / eps).clamp_min(tiny)  # B x N (their Q is its transpose)
        q = q / (q.sum() + tiny)
        num_experts, global_batch = q.shape[1], q.shape[0] * world_size()
        for _ in range(iters):
            q = q / (all_reduce_sum(q.sum(dim=0, keepdim=True)) + tiny) / num_experts
            q = q / (q.sum(dim=1, keepdim=True) + tiny) / global_batch
            q = q.clamp_min(tiny)
        q = (q * global_batch).clamp_min(tiny)
        q = (q / (q.sum(dim=1, keepdim=True) + tiny)).clamp_min(tiny)
        return q.log()


def log_balanced_routing(
    logits: torch.Tensor, eps: float = 0.05, iters: int = 3, impl: SinkhornImpl = "swav"
) -> torch.Tensor:
    """log a_T by the chosen Sinkhorn variant: ``swav`` (exact, log space, default) or
    ``authors`` (the released M-IDoL code's, :func:`log_sinkhorn_knopp_authors`)."""
    if impl == "swav":
        return log_sinkhorn_knopp(logits, eps, iters)
    if impl == "authors":
        return log_sinkhorn_knopp_authors(logits, eps, iters)
    raise ValueError(f"sinkhorn_impl must be 'swav' or 'authors', got {impl!r}")
