"""Switch Transformer load-balance term, an optional counter to expert collapse
(docs/papers/m-idol.md, 'Known risk: expert collapse')."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def switch_load_balance_loss(router_logits: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """``N * sum_i f_i * P_i`` (Fedus et al. 2021, Eq. 4): f_i is the fraction of rows whose
    top-1 expert is i, P_i the mean router probability of expert i. Equals 1 when routing is
    uniform and N when every row goes to one expert; the gradient flows through P only.

    Args:
        router_logits: T x N router logits (any number of rows: views x images).
        expert_index: length-T top-1 expert of every row.
    """
    if router_logits.ndim != 2 or expert_index.shape != router_logits.shape[:1]:
        raise ValueError(
            f"expected T x N logits and T indices, got {tuple(router_logits.shape)} and "
            f"{tuple(expert_index.shape)}"
        )
    num_experts = router_logits.shape[1]
    probs = router_logits.float().softmax(dim=-1)
    # one_hot(...).mean, not bincount: no read-back of the maximum to the host on CUDA
    fraction = F.one_hot(expert_index, num_experts).to(probs).mean(dim=0)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
