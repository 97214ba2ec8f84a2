"""Multiple-instance pooling: the embeddings of one group (a patient's images, a volume's
slices) pooled into one vector, for bags of different sizes padded into one batch.

Both poolers take ``x`` of shape ``(B, N, D)`` (B bags of at most N instances) and a boolean
``mask`` ``(B, N)`` that is True for real instances and False for padding, and return the pooled
``(B, D)`` embeddings with the ``(B, N)`` instance weights (rows sum to 1 over the real
instances; padding gets exactly 0). Padding never changes a bag's result: its values are never
read into the output. A bag without any real instance is an error (nothing to pool).

* :class:`MeanPool`: the mean over the real instances.
* :class:`AttentionMIL`: attention pooling of Ilse, Tomczak & Welling 2018, "Attention-based
  Deep Multiple Instance Learning" (ICML), eq. 7 with the gated weights of eq. 9 (or the plain
  tanh weights of eq. 8 with ``gated=False``).
"""

from __future__ import annotations

import torch
from torch import nn


def check_bags(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The boolean ``(B, N)`` mask of ``x`` ``(B, N, D)`` (all True when ``mask`` is None);
    ``ValueError`` on a shape mismatch or a bag without any real instance."""
    if x.ndim != 3:
        raise ValueError(f"bags must be (B, N, D), got shape {tuple(x.shape)}")
    if mask is None:
        if x.shape[1] == 0:
            raise ValueError("bags must hold at least one instance, got N = 0")
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"{int(empty.sum())} bag(s) have no real instance (mask all False), "
                         f"e.g. bag {int(empty.nonzero()[0, 0])}")
    return mask


class MeanPool(nn.Module):
    """Mean of the real instances of each bag: ``z = sum_k m_k h_k / sum_k m_k``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = check_bags(x, mask)
        w = mask.to(x.dtype)
        w = w / w.sum(dim=1, keepdim=True)
        # where() rather than a product: a NaN or inf in a padded slot must not leak (0 * inf).
        pooled = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        return (pooled * w.unsqueeze(-1)).sum(dim=1), w


class AttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, eqs. 7-9).

    ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` over the real instances of a bag
    (eq. 9; ``gated=False`` drops the sigmoid gate: eq. 8) and ``z = sum_k a_k h_k`` (eq. 7).
    Padded instances get a logit of -inf, so their weight is exactly 0 and the softmax
    normalises over the real ones only. The paper's ``V``, ``U`` have no bias term written but its
    code uses ``nn.Linear`` with bias, as here.

    Args:
        dim: Instance embedding width D.
        hidden: Width L of the attention MLP (the paper: 128).
        gated: Use the sigmoid gate of eq. 9 (the paper's best variant).
        dropout: Dropout on the attention hidden layer (0: none).
    """

    def __init__(self, dim: int, hidden: int = 128, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got {dim}, {hidden}")
        self.dim = dim
        self.gated = gated
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` attention logits ``w^T (tanh(V h) [* sigmoid(U h)])`` before masking."""
        h = torch.tanh(self.V(x))
        if self.U is not None:
            h = h * torch.sigmoid(self.U(x))
        return self.w(self.dropout(h)).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = check_bags(x, mask)
        if x.shape[-1] != self.dim:
            raise ValueError(f"instances must have D = {self.dim} features, got {x.shape[-1]}")
        # Padding may hold anything (zeros, NaN): clear it before the MLP so it cannot poison
        # the real instances' gradients, and give it -inf logits so its weight is exactly 0.
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        logits = self.logits(x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # softmax in float32 under autocast
            logits = logits.float()
        logits = logits.masked_fill(~mask, float("-inf"))
        a = torch.softmax(logits, dim=1).to(x.dtype)
        return torch.einsum("bn,bnd->bd", a, x), a
