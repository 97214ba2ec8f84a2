"""Gradient norms per loss term, for seeing which term drives a shared network.

M-IDoL's L_route and L_cst both reach the backbone; when one is hundreds of times larger, a
global-norm clip scales the sum and the smaller term's signal all but vanishes (measured in
experiments/results/grad_norms_2026-12-02.md). These helpers measure that during training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def total_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm of all given tensors together (None entries skipped); 0 when there are none."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    norms = torch._foreach_norm(present)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def term_grad_norms(terms: Mapping[str, torch.Tensor], params: list[torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """``{name: ||d term / d params||}`` for each weighted loss term, without touching ``.grad``
    (``torch.autograd.grad`` with ``retain_graph``, so the usual backward still runs after).
    A term that does not depend on ``params`` gets 0."""
    out: dict[str, torch.Tensor] = {}
    for name, term in terms.items():
        if not term.requires_grad:
            out[name] = torch.zeros((), device=term.device)
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[name] = total_norm(grads).to(term.device)
    return out
