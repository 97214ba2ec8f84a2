"""MedMIX fusion blocks: experts within one input, and inputs within one patient.

MedMIX (Cho, Qiu, Li 2026, "MedMIX: Modality-Internal Expert Fusion for Multimodal Medical
Diagnosis", arXiv 2605.16639) establishes two fusion stages: intra-modality fusion of several
small expert embeddings, and learned, sample-specific fusion over the modalities a patient
has. Its code is not public; the layers below are midol's design, a reconstruction from the
abstract (see ``docs/papers/medmix.md``). Plain PyTorch, no Lightning.

Absence is always a boolean mask, never a zero image or a zero vector: every block replaces
an absent row by a constant with ``torch.where`` before any arithmetic, so NaN or garbage in
an absent input changes neither the output nor any gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

PoolMode = Literal["attention", "mean", "concat"]
FusionMode = Literal["reliability", "mean", "concat_missing", "transformer"]

# Placeholder for a categorical value that is missing (its embedding row is index 0).
MISSING_CODE = -1


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``scores`` over the entries where ``mask`` is True (midol's design).

    ``beta_m = r_m exp(s_m) / sum_j r_j exp(s_j)`` (docs/papers/medmix.md, 'Inter-input fusion').
    Masked entries get exactly 0 and do not enter the normaliser, whatever their score (NaN
    and inf included); their gradient is 0. A slice with no True entry returns all zeros.
    Half-precision scores are normalised in float32 and returned in their own dtype.

    Args:
        scores: any shape.
        mask: bool, broadcastable to ``scores``.
        dim: the dimension to normalise over.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    mask = mask.expand_as(work)
    # A finite fill (not -inf) so that a fully masked slice gives 0/1, not (-inf)-(-inf) = NaN.
    filled = torch.where(mask, work, torch.finfo(work.dtype).min)
    shifted = filled - filled.amax(dim=dim, keepdim=True).detach()
    exp = torch.where(mask, shifted.exp(), torch.zeros((), dtype=work.dtype, device=work.device))
    total = exp.sum(dim=dim, keepdim=True)
    return (exp / total.clamp_min(torch.finfo(work.dtype).tiny)).to(scores.dtype)


def _check_present(present: torch.Tensor, batch: int, num_inputs: int) -> None:
    if present.dtype != torch.bool or present.shape != (batch, num_inputs):
        raise ValueError(
            f"present must be a bool tensor of shape {(batch, num_inputs)}, got "
            f"{present.dtype} {tuple(present.shape)}"
        )
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"every sample needs at least one present input; {len(rows)} sample(s) have none "
            f"(batch rows {rows[:10]})"
        )


class PooledOutput(NamedTuple):
    embedding: torch.Tensor  # B x dim: z_m, the fused embedding of one input
    weights: torch.Tensor | None  # B x K attention weights a_k (attention mode only)


class ExpertPooling(nn.Module):
    """Intra-input fusion of K frozen expert embeddings (MedMIX part 1; layers: midol's design).

    Each expert embedding ``e_k`` (widths may differ) becomes ``h_k = LayerNorm(W_k e_k)`` in a
    common width ``dim``; ``mode`` then fuses them:

    * ``"attention"``: ``z = sum_k a_k h_k``, ``a = softmax_k(q^T tanh(U h_k))``;
    * ``"mean"``: ``z = mean_k h_k``;
    * ``"concat"``: ``z = W [h_1; ...; h_K]``.

    ``expert_dropout`` (training mode only) drops each expert of each sample with that
    probability, keeping at least one (a random one among the experts of a sample that lost
    all of them): attention is renormalised over the kept experts, the mean runs over them, and
    concat zeroes the dropped blocks and rescales by ``K / kept`` (the mean's renormalisation,
    so the projection sees the same scale as in evaluation).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        dim: int,
        mode: PoolMode = "attention",
        attention_dim: int | None = None,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        if len(in_dims) < 1:
            raise ValueError("ExpertPooling needs at least one expert")
        if mode not in ("attention", "mean", "concat"):
            raise ValueError(f"unknown mode {mode!r}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must lie in [0, 1), got {expert_dropout}")
        self.in_dims = tuple(int(d) for d in in_dims)
        self.dim = dim
        self.mode = mode
        self.expert_dropout = expert_dropout
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for d in self.in_dims
        )
        self.attention_u: nn.Linear | None = None
        self.attention_q: nn.Linear | None = None
        self.concat_out: nn.Linear | None = None
        if mode == "attention":
            hidden = attention_dim or dim
            self.attention_u = nn.Linear(dim, hidden)
            self.attention_q = nn.Linear(hidden, 1, bias=False)
        elif mode == "concat":
            self.concat_out = nn.Linear(len(self.in_dims) * dim, dim)

    @property
    def num_experts(self) -> int:
        return len(self.in_dims)

    def keep_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """B x K bool: the experts each sample keeps (all of them unless training with
        ``expert_dropout``). Uses the global RNG, so ``torch.manual_seed`` fixes it."""
        k = self.num_experts
        if not self.training or self.expert_dropout == 0.0 or k == 1:
            return torch.ones(batch, k, dtype=torch.bool, device=device)
        u = torch.rand(batch, k, device=device)
        keep = u >= self.expert_dropout
        # The expert with the largest u is a uniform pick among all K; re-enable it where a
        # sample lost every expert.
        rescue = nn.functional.one_hot(u.argmax(dim=1), k).bool()
        return torch.where(keep.any(dim=1, keepdim=True), keep, rescue)

    def forward(
        self, experts: Sequence[torch.Tensor] | torch.Tensor, present: torch.Tensor | None = None
    ) -> PooledOutput:
        """Fuse ``experts`` (K tensors B x D_k, or one B x K x D tensor).

        ``present`` (B, bool) marks the samples that have this input: the rows of the others
        are zeroed first, so their (finite, meaningless) output is safe to mask downstream even
        when the cached features of an absent input are NaN.
        """
        if isinstance(experts, torch.Tensor):
            experts = experts.unbind(dim=1)
        if len(experts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert embeddings, got {len(experts)}")
        batch = experts[0].shape[0]
        for k, (e, d) in enumerate(zip(experts, self.in_dims, strict=True)):
            if e.ndim != 2 or e.shape != (batch, d):
                raise ValueError(f"expert {k}: expected shape {(batch, d)}, got {tuple(e.shape)}")
        if present is not None:
            if present.dtype != torch.bool or present.shape != (batch,):
                raise ValueError(f"present must be bool of shape {(batch,)}")
            experts = [torch.where(present[:, None], e, torch.zeros((), dtype=e.dtype,
                                   device=e.device)) for e in experts]
        h = torch.stack([p(e) for p, e in zip(self.projections, experts, strict=True)], dim=1)
        keep = self.keep_mask(batch, h.device)
        if self.mode == "attention":
            assert self.attention_u is not None and self.attention_q is not None
            scores = self.attention_q(torch.tanh(self.attention_u(h))).squeeze(-1)
            weights = masked_softmax(scores, keep, dim=1)
            return PooledOutput((weights.unsqueeze(-1) * h).sum(dim=1), weights)
        kept = keep.sum(dim=1, keepdim=True).to(h.dtype)
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        h = torch.where(keep.unsqueeze(-1), h, zero)
        if self.mode == "mean":
            return PooledOutput(h.sum(dim=1) / kept, None)
        assert self.concat_out is not None
        scale = (self.num_experts / kept).unsqueeze(-1)
        return PooledOutput(self.concat_out((h * scale).flatten(1)), None)


class TabularEncoder(nn.Module):
    """Encoder of a tabular input (numeric + categorical columns) to ``dim`` (midol's design).

    Numeric columns are standardised with statistics of the training split only
    (:meth:`fit`, or ``mean``/``std`` given), a missing value becomes 0 after standardisation
    and a per-column missing flag (1 = missing) is appended. Each categorical column gets an
    embedding whose row 0 is reserved for "missing" (code :data:`MISSING_CODE`); a learned
    embedding equals a one-hot followed by a linear layer. An MLP and a LayerNorm map the
    concatenation to ``dim``, the scale of :class:`ExpertPooling`'s ``h_k``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        num_numeric: int,
        dim: int,
        cardinalities: Sequence[int] = (),
        embed_dim: int = 8,
        hidden_dim: int = 64,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ):
        super().__init__()
        if num_numeric < 0 or (num_numeric == 0 and not cardinalities):
            raise ValueError("TabularEncoder needs at least one numeric or categorical column")
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"cardinalities must be >= 1, got {list(cardinalities)}")
        self.num_numeric = num_numeric
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.register_buffer("mean", torch.zeros(num_numeric))
        self.register_buffer("std", torch.ones(num_numeric))
        # A buffer, so a checkpoint remembers that the statistics were fitted.
        self.register_buffer("fitted", torch.tensor(num_numeric == 0))
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None and std is not None:
            self.set_statistics(mean, std)
        self.embeddings = nn.ModuleList(nn.Embedding(c + 1, embed_dim)
                                        for c in self.cardinalities)
        in_dim = 2 * num_numeric + embed_dim * len(self.cardinalities)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim), nn.LayerNorm(dim)
        )

    def embed_dtype(self) -> torch.dtype:
        """The parameters' dtype (inputs are cast to it)."""
        return next(self.mlp.parameters()).dtype

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use given per-column statistics (e.g. computed elsewhere on the training split)."""
        shape = (self.num_numeric,)
        if mean.shape != shape or std.shape != shape:
            raise ValueError(f"mean and std must have shape {shape}")
        if bool((std <= 0).any()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("std must be > 0 and mean finite")
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.fitted.fill_(True)

    @torch.no_grad()
    def fit(self, numeric: torch.Tensor, numeric_present: torch.Tensor) -> None:
        """Per-column mean and (population) std of the present values of the training rows.

        Pass the training split only: nothing else is read. A column with fewer than two
        present values, or constant ones, gets std 1 (and mean 0 when none is present).
        """
        self._check_numeric(numeric, numeric_present)
        present = numeric_present
        zero = torch.zeros((), dtype=numeric.dtype, device=numeric.device)
        values = torch.where(present, numeric, zero)
        count = present.sum(dim=0).to(numeric.dtype)
        mean = values.sum(dim=0) / count.clamp_min(1)
        centred = torch.where(present, values - mean, zero)
        std = (centred.square().sum(dim=0) / count.clamp_min(1)).sqrt()
        std = torch.where((count >= 2) & (std > 0), std, torch.ones_like(std))
        self.set_statistics(mean.to(self.mean), std.to(self.std))

    def _check_numeric(self, numeric: torch.Tensor, numeric_present: torch.Tensor) -> None:
        if numeric.ndim != 2 or numeric.shape[1] != self.num_numeric:
            raise ValueError(f"numeric must be B x {self.num_numeric}, got {tuple(numeric.shape)}")
        if numeric_present.dtype != torch.bool or numeric_present.shape != numeric.shape:
            raise ValueError("numeric_present must be a bool tensor shaped like numeric")

    def forward(
        self,
        numeric: torch.Tensor | None = None,
        numeric_present: torch.Tensor | None = None,
        categorical: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B x dim from ``numeric`` (B x N float; missing entries may hold anything, NaN
        included), ``numeric_present`` (B x N bool) and ``categorical`` (B x C long codes in
        ``[0, cardinality)``, :data:`MISSING_CODE` for missing)."""
        parts: list[torch.Tensor] = []
        if self.num_numeric:
            if numeric is None or numeric_present is None:
                raise ValueError("numeric and numeric_present are required")
            self._check_numeric(numeric, numeric_present)
            if not bool(self.fitted):
                raise RuntimeError("TabularEncoder: call fit() on the training rows first")
            zero = torch.zeros((), dtype=numeric.dtype, device=numeric.device)
            safe = torch.where(numeric_present, numeric, zero)
            standard = torch.where(numeric_present, (safe - self.mean) / self.std, zero)
            parts += [standard, (~numeric_present).to(numeric.dtype)]
        if self.cardinalities:
            if categorical is None or categorical.shape[1:] != (len(self.cardinalities),):
                raise ValueError(f"categorical must be B x {len(self.cardinalities)} codes")
            for c, (embedding, card) in enumerate(
                zip(self.embeddings, self.cardinalities, strict=True)
            ):
                codes = categorical[:, c]
                if bool(((codes < MISSING_CODE) | (codes >= card)).any()):
                    raise ValueError(f"categorical column {c}: codes must lie in "
                                     f"[{MISSING_CODE}, {card})")
                parts.append(embedding(codes + 1))  # MISSING_CODE -> row 0
        dtype = self.embed_dtype()
        return self.mlp(torch.cat([p.to(dtype) for p in parts], dim=1))


class FusionOutput(NamedTuple):
    fused: torch.Tensor  # B x dim
    weights: torch.Tensor | None  # B x M beta_m (reliability and mean modes), 0 where absent


class InputFusion(nn.Module):
    """Fusion of M per-input embeddings over the inputs a sample has (MedMIX part 2; layers:
    midol's design).

    * ``"reliability"``: a score ``s_m = MLP(z_m) + b_m`` (one MLP shared by the inputs, a
      learned offset per input, plus an optional caller's ``score_bias``, e.g. the negative
      entropy of an auxiliary head), ``beta = masked_softmax(s, present)``,
      ``z = sum_m beta_m z_m``;
    * ``"mean"``: the mean of the present inputs;
    * ``"concat_missing"``: each absent input replaced by a learned "missing" embedding, then
      ``Linear(M * dim -> dim)`` on the concatenation;
    * ``"transformer"``: a small pre-norm TransformerEncoder over input tokens
      (``z_m`` + a learned input-type embedding), absent tokens masked as keys, then the mean
      of the present output tokens.

    Absent inputs get exactly zero weight and cannot change the output: their rows are
    replaced with ``torch.where`` before any arithmetic. Every sample must have at least one
    present input (``ValueError`` otherwise).
    """

    def __init__(
        self,
        num_inputs: int,
        dim: int,
        mode: FusionMode = "reliability",
        hidden_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        if mode not in ("reliability", "mean", "concat_missing", "transformer"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "transformer" and dim % num_heads:
            raise ValueError(f"dim must be a multiple of {num_heads} (the transformer fusion's "
                             f"heads), got {dim}")
        self.num_inputs = num_inputs
        self.dim = dim
        self.mode = mode
        self.scorer: nn.Sequential | None = None
        self.input_bias: nn.Parameter | None = None
        self.missing: nn.Parameter | None = None
        self.concat_out: nn.Linear | None = None
        self.type_embedding: nn.Parameter | None = None
        self.encoder: nn.TransformerEncoder | None = None
        if mode == "reliability":
            self.scorer = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(),
                                        nn.Linear(hidden_dim, 1))
            self.input_bias = nn.Parameter(torch.zeros(num_inputs))
        elif mode == "concat_missing":
            self.missing = nn.Parameter(torch.randn(num_inputs, dim) * 0.02)
            self.concat_out = nn.Linear(num_inputs * dim, dim)
        elif mode == "transformer":
            self.type_embedding = nn.Parameter(torch.randn(num_inputs, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(
                dim, num_heads, dim_feedforward=2 * dim, dropout=dropout, activation="gelu",
                batch_first=True, norm_first=True,
            )
            # No nested tensors: padded tokens keep their (ignored) values, the same in train
            # and eval mode.
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(
        self, z: torch.Tensor, present: torch.Tensor, score_bias: torch.Tensor | None = None
    ) -> FusionOutput:
        """Fuse ``z`` (B x M x dim) over ``present`` (B x M bool); ``score_bias`` (B x M) is
        added to the reliability scores."""
        if z.ndim != 3 or z.shape[1:] != (self.num_inputs, self.dim):
            raise ValueError(f"z must be B x {self.num_inputs} x {self.dim}, got {tuple(z.shape)}")
        _check_present(present, z.shape[0], self.num_inputs)
        mask = present.unsqueeze(-1)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        if self.mode == "concat_missing":
            assert self.missing is not None and self.concat_out is not None
            filled = torch.where(mask, z, self.missing.to(z.dtype))
            return FusionOutput(self.concat_out(filled.flatten(1)), None)
        safe = torch.where(mask, z, zero)
        if self.mode == "reliability":
            assert self.scorer is not None and self.input_bias is not None
            scores = self.scorer(safe).squeeze(-1) + self.input_bias
            if score_bias is not None:
                scores = scores + torch.where(present, score_bias, zero)
            weights = masked_softmax(scores, present, dim=1)
            return FusionOutput((weights.unsqueeze(-1) * safe).sum(dim=1), weights)
        weights = present.to(z.dtype) / present.sum(dim=1, keepdim=True).to(z.dtype)
        if self.mode == "mean":
            return FusionOutput((weights.unsqueeze(-1) * safe).sum(dim=1), weights)
        assert self.encoder is not None and self.type_embedding is not None
        tokens = self.encoder(safe + self.type_embedding.to(z.dtype),
                              src_key_padding_mask=~present)
        tokens = torch.where(mask, tokens, zero)
        return FusionOutput((weights.unsqueeze(-1) * tokens).sum(dim=1), None)
