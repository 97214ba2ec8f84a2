"""The MoE projector of M-IDoL (M-IDoL Eq. 9-11, docs/papers/m-idol.md): router, N experts,
shared projection."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from midol.models.heads import ExpertBank, NormedLinear, init_linear_

Projection = Literal["weightnorm", "linear"]


class MoEOutput(NamedTuple):
    representation: torch.Tensor  # B x out_dim: x = l(e_i(h)), Eq. 11
    router_logits: torch.Tensor | None  # B x N (None with a single expert)
    expert_index: torch.Tensor  # B x top_k, the experts that produced each row


class MoEProjector(nn.Module):
    """Router (one linear layer d -> N), N expert FFNs, top-k routing, shared projection l.

    ``projection="weightnorm"`` with ``l2_norm=True`` is the authors' DINO-like head
    (expert FFN -> L2-normalise -> weight-normalised linear to ``out_dim``, norm frozen when
    ``norm_last_layer``); ``projection="linear"`` is a plain linear ``l``. With
    ``num_experts=1`` there is no router: the head of the no-MoE DINO baseline, built from the
    same blocks so the comparison differs only by the MoE.

    Top-1 output is ``e_i(h)`` itself (Eq. 11); ``gate_weighted_output`` multiplies it by its
    routing probability (Switch Transformer), which lets the representation loss train the
    router too; with ``l2_norm`` the gate multiplies the normalised output
    (``p_i * e_i(h) / ||e_i(h)||``), since a gate applied before the norm cancels. With ``top_k > 1`` the selected outputs are mixed with renormalised gates.
    ``router_noise`` adds Gaussian noise of that standard deviation to the router logits in
    training mode (noisy top-k gating), an optional counter to expert collapse; those noisy
    logits are also what the routing loss sees.

    ``gate_noise`` is the released code's Tutel gate noise instead: in training mode (student,
    and the teacher when it runs in train mode) the logits used to choose and weight the
    experts get Gaussian noise of std ``gate_noise / num_experts``, while the noise-free logits
    are returned for L_route (Tutel ``moe_layer.py``: ``logits + gate_noise * randn / E``;
    the authors set 1.0). ``router_bias=False`` is their bias-free Tutel router.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int = 5,
        top_k: int = 1,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 1024,
        out_dim: int = 65536,
        num_layers: int = 2,
        l2_norm: bool = True,
        projection: Projection = "weightnorm",
        norm_last_layer: bool = True,
        gate_weighted_output: bool = False,
        router_noise: float = 0.0,
        gate_noise: float = 0.0,
        router_bias: bool = True,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.l2_norm = l2_norm
        self.gate_weighted_output = gate_weighted_output
        if router_noise < 0:
            raise ValueError(f"router_noise must be >= 0, got {router_noise}")
        self.router_noise = router_noise
        if gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {gate_noise}")
        self.gate_noise = gate_noise
        self.router = (init_linear_(nn.Linear(in_dim, num_experts, bias=router_bias))
                       if num_experts > 1 else None)
        self.experts = ExpertBank(num_experts, in_dim, hidden_dim, bottleneck_dim, num_layers)
        if projection == "weightnorm":
            self.projection: nn.Module = NormedLinear(bottleneck_dim, out_dim, norm_last_layer)
        elif projection == "linear":
            self.projection = init_linear_(nn.Linear(bottleneck_dim, out_dim, bias=False))
        else:
            raise ValueError(f"unknown projection {projection!r}")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Router logits (the ones L_route sees), top-k expert indices (B x k) and their output
        weights (B x k)."""
        if self.router is None:
            index = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
            return None, index, torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
        logits = self.router(x)
        if self.training and self.router_noise > 0:
            logits = logits + self.router_noise * torch.randn_like(logits)
        gate_logits = logits.float()
        if self.training and self.gate_noise > 0:
            gate_logits = gate_logits + (self.gate_noise / self.num_experts) * torch.randn_like(gate_logits)
        probs = gate_logits.softmax(dim=-1)
        gate, index = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        elif not self.gate_weighted_output:
            gate = torch.ones_like(gate)
        return logits, index, gate.to(x.dtype)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        logits, index, gate = self.route(x)
        every_expert = self.experts(x)  # N x B x E
        rows = torch.arange(x.shape[0], device=x.device)
        chosen = every_expert[index.T, rows]  # k x B x E
        if self.top_k == 1 and self.gate_weighted_output and self.l2_norm:
            # Gate after the L2 norm: before it, the norm divides the gate out again and the
            # router gets no gradient from the representation loss (midol 0.1.0's bug).
            h = F.normalize(chosen[0], dim=-1) * gate
        else:
            h = (chosen * gate.T.unsqueeze(-1)).sum(dim=0)
            if self.l2_norm:
                h = F.normalize(h, dim=-1)
        return MoEOutput(self.projection(h), logits, index)
