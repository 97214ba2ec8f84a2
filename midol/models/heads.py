"""Building blocks of the projection heads: stacked expert FFNs and the weight-normalised
output layer of DINO."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertBank(nn.Module):
    """N independent feed-forward networks (Linear -> GELU -> ... -> Linear) with stacked
    weights, so every expert runs in one batched matmul.

    Top-1 routing then picks each row's expert output. Computing all N experts densely costs
    N small FFNs per view (a fraction of a percent of a Swin-B forward) and keeps shapes static:
    no host synchronisation, no data-dependent indexing, friendly to ``torch.compile``. Only the
    selected expert's slice receives gradient.
    """

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.num_experts = num_experts
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_experts, b)) for b in dims[1:]]
        )
        for w in self.weights:
            nn.init.trunc_normal_(w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_dim -> N x B x out_dim (every expert applied to every row)."""
        h = x.unsqueeze(0).expand(self.num_experts, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1).to(h.dtype), h, w.to(h.dtype))
            if i < last:
                h = F.gelu(h)
        return h


class NormedLinear(nn.Module):
    """Weight-normalised linear layer ``W = g * v / ||v||`` (per output unit), no bias.

    With ``norm_frozen`` (DINO's ``norm_last_layer``) g is fixed to 1, so only the direction
    of every output unit is learnt — DINO found this stabilises training with large out_dim.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_frozen: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.norm_frozen = norm_frozen
        if norm_frozen:
            self.register_buffer("weight_g", torch.ones(out_dim, 1))
        else:
            self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        out_dim, in_dim = self.weight_v.shape
        return f"in_dim={in_dim}, out_dim={out_dim}, norm_frozen={self.norm_frozen}"


def init_linear_(layer: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
