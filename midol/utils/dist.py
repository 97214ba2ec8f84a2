"""Every collective midol uses, in one place. Each is a no-op on a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (returns a new tensor; gradient does not flow through)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over ranks (no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, ordered by rank (equal shapes required)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather_no_grad_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`gather_no_grad` with ``dtype`` on the wire (e.g. bfloat16: half the bytes of
    float32), returned in ``x.dtype``; this rank's own rows are ``x`` itself, not rounded."""
    if not is_distributed() or dtype == x.dtype:
        return gather_no_grad(x)
    out = gather_no_grad(x.to(dtype)).to(x.dtype)
    rows = x.shape[0]
    out[rank() * rows:(rank() + 1) * rows] = x
    return out
