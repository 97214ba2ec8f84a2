"""The Director-Experts (DEX) layer of He, You, Li 2026 as a drop-in for a timm ViT block's MLP.

Every block keeps its attention; its MLP becomes E routed experts plus a director MLP that takes
no gradient and is updated by a group EMA of the experts (``x = x + DEX(norm2(x))``). After
pre-training the director alone is a plain dense ViT MLP (:func:`director_state_dict`).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from midol.models.ema import group_ema_
from midol.utils.dist import all_reduce_sum

DEXMode = Literal["experts", "director"]
_MODES = ("experts", "director")
DEXDispatch = Literal["loop", "sorted", "dense", "grouped"]
DISPATCHES = ("loop", "sorted", "dense", "grouped")


@dataclass
class DEXRouting:
    """What one DEX forward leaves for the losses and monitors (rows: images, or tokens with
    token routing)."""

    probs: torch.Tensor  # rows x E float32 softmax of the noisy logits, before top-k (L_bal)
    gates: torch.Tensor  # rows x k float32 renormalised top-k gates
    indices: torch.Tensor  # rows x k chosen experts
    expert_out: torch.Tensor  # B x N x D gated expert output, the tensor returned (f_E)
    director_out: torch.Tensor | None  # B x N x D director(x) under no_grad (f_D), or None
    omega: torch.Tensor  # E, each expert's share of the gate mass (all-reduced in training)


class DEXLayer(nn.Module):
    """E expert MLPs routed per image (top-k of the class token's routing probabilities) and a
    director MLP tracking them by group EMA (DEX, He, You, Li 2026; docs/papers/dex.md,
    'Image-wise routing' and 'Director update (group EMA)').

    Set from outside every step: ``noise_std`` (sigma_t, cosine 1 -> 0 in the paper),
    ``director_momentum`` (m, cosine 0.99 -> 0.999), ``update_director`` and ``mode``
    (``"experts"``: routed experts, noise only in training; ``"director"``: ``director(x)``,
    the dense deployment model). ``compute_director_out``: ``None`` computes ``director(x)``
    for L_co in training only, ``True``/``False`` always/never.

    In training with gradients enabled, each forward updates the ``freq`` buffer and (with
    ``update_director``) the director, before backward, so the director tracks the experts'
    pre-update weights (authors' code); with ``defer_updates`` (what :class:`~midol.methods.DEX`
    sets) forward only records the shares and :meth:`commit` applies them. Omega is all-reduced
    over ranks so every rank applies the same update (the authors' code uses each rank's local
    batch and lets copies drift).

    ``dispatch`` (issue 30) picks how rows reach their experts; all four give the same output
    and gradients to float rounding (tested):

    * ``loop``: each expert runs on the rows that chose it, found by ``torch.where``: one
      device-to-host read per expert per block, data-dependent shapes (no whole-graph compile).
    * ``sorted``: the rows sorted by expert and split into segments: one read-back of the E
      segment sizes per block instead of E; still data-dependent shapes.
    * ``dense``: every expert on every row, weighted by its gate (0 where not chosen): no
      read-back and static shapes (compiles as one graph), at E / k times the experts' FLOPs. An
      expert no row chose gets a zero gradient where ``loop``/``sorted`` leave it ``None``
      (AdamW then still moves it by its moments; the loss and gradients are the same).
    * ``grouped``: the rows sorted by expert and each MLP layer run as one grouped GEMM whose
      segment offsets stay on the device (``torch._grouped_mm``, as MoE training code such as
      torchtitan uses): no read-back, static shapes, the loop's FLOPs; the zero-gradient note
      of ``dense`` applies. Needs ``dim`` and ``hidden_dim`` divisible by 8 (the GEMM's 16-byte
      alignment); whole-graph compile only in bf16 (torch's shape rule for the op).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        temperature: float = 0.5,
        freq_momentum: float = 0.99,
        token_routing: bool = False,
        num_prefix_tokens: int = 1,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        dispatch: DEXDispatch = "loop",
    ):
        super().__init__()
        _check_dispatch(dispatch, dim, hidden_dim)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= freq_momentum <= 1.0:
            raise ValueError(f"freq_momentum must lie in [0, 1], got {freq_momentum}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = temperature
        self.freq_momentum = freq_momentum
        self.token_routing = token_routing
        self.num_prefix_tokens = num_prefix_tokens
        self.dispatch: DEXDispatch = dispatch
        self.dim, self.hidden_dim = dim, hidden_dim

        def mlp() -> Mlp:
            return Mlp(dim, hidden_dim, act_layer=act_layer, bias=bias, drop=drop)

        self.experts = nn.ModuleList(mlp() for _ in range(num_experts))
        self.director = mlp()
        self.director.requires_grad_(False)
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("freq", torch.full((num_experts,), 1.0 / num_experts))

        # sigma_t as a tensor too: a compiled forward reads it without specialising on its
        # value (a float attribute that changes every step would recompile every step);
        # non-persistent, so state dicts are unchanged.
        self.register_buffer("noise_scale", torch.ones(()), persistent=False)
        self._noise_std = 1.0
        self._noisy = True  # what the forward branches on (a bool guard, not the float's value)
        self.director_momentum = 0.99
        self.update_director = True
        self.compute_director_out: bool | None = None
        self._mode: DEXMode = "experts"
        self.last: DEXRouting | None = None
        # Deferred: forward only records Omega and commit() applies it after backward.
        # Activation checkpointing re-runs forward during backward, and an update made in the
        # first forward would change the recomputed routing (the noise reads ``freq``) and
        # update twice. The experts do not change before the optimiser step, so the director
        # still tracks their pre-update weights, as in the authors' code.
        self.defer_updates = False
        self._pending_omega: torch.Tensor | None = None

    @property
    def noise_std(self) -> float:
        """sigma_t of the routing noise ``sigma_t (eps + f)`` (training only)."""
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self._noise_std = float(value)
        self._noisy = self._noise_std > 0
        self.noise_scale.fill_(self._noise_std)  # in place: no host-to-device copy

    @property
    def mode(self) -> DEXMode:
        return self._mode

    @mode.setter
    def mode(self, value: DEXMode) -> None:
        if value not in _MODES:
            raise ValueError(f"unknown DEX mode {value!r}; expected one of {_MODES}")
        self._mode = value

    def frequency_bias(self) -> torch.Tensor:
        """``f_e = 1 - freq_e / sum(freq)``: rarely used experts get a larger boost."""
        freq = self.freq.float()
        return 1.0 - freq / freq.sum()

    def route(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing probabilities (rows x E), top-k gates renormalised to sum 1 and indices,
        all from float32 logits; ``r`` is the rows x D router input."""
        # float32 even under bf16 autocast: k of E nearly equal probabilities must not tie
        with torch.autocast(device_type=r.device.type, enabled=False):
            logits = F.linear(r.float(), self.router.weight.float())
            if self.training and self._noisy:
                eps = torch.randn_like(logits)
                logits = logits + self.noise_scale.float() * (eps + self.frequency_bias())
            probs = F.softmax(logits / self.temperature, dim=-1)
            gates, indices = probs.topk(self.top_k, dim=-1)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, gates, indices

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_routing:
            return x.reshape(-1, x.shape[-1])
        # A ViT without a class token routes on the mean token instead.
        return x[:, 0] if self.num_prefix_tokens > 0 else x.mean(dim=1)

    def mix(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_k gate_k * expert_k(x)`` per row (images, or tokens with token routing), by
        the layer's ``dispatch``."""
        b, n, d = x.shape
        units = x.reshape(b * n, 1, d) if self.token_routing else x
        if self.dispatch == "dense":
            out = self._mix_dense(units, gates, indices)
        elif self.dispatch == "sorted":
            out = self._mix_sorted(units, gates, indices)
        elif self.dispatch == "grouped":
            out = self._mix_grouped(units, gates, indices)
        else:
            out = self._mix_loop(units, gates, indices)
        return out.reshape(b, n, -1)

    def _mix_loop(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each expert only on the rows that chose it (one ``torch.where`` read-back each)."""
        out: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(indices == e)
            if rows.numel() == 0:
                continue
            y = expert(units[rows])
            # zeros created lazily: under autocast the experts' dtype is only known now
            if out is None:
                out = y.new_zeros(units.shape[:-1] + y.shape[-1:])
            out = out.index_add(0, rows, y * gates[rows, slot].to(y.dtype)[:, None, None])
        assert out is not None  # every row chose k >= 1 experts
        return out

    def _mix_sorted(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The rows x k choices sorted by expert (stable: row order kept within an expert),
        gathered once and split into per-expert segments; one read-back of E sizes."""
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        sizes = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = torch.div(order, indices.shape[1], rounding_mode="floor")
        weight = gates.reshape(-1)[order]
        segments = units[rows].split(sizes)
        ys = [expert(seg) for expert, seg, size in zip(self.experts, segments, sizes, strict=True) if size]
        y = torch.cat(ys)
        out = y.new_zeros(units.shape[:-1] + y.shape[-1:])
        return out.index_add(0, rows, y * weight.to(y.dtype)[:, None, None])

    def _mix_grouped(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The choices sorted by expert (as ``sorted``), then fc1 and fc2 of all experts as one
        grouped GEMM each over the per-expert segments; the segment ends are computed on the
        device (a comparison sum, not ``bincount``), so nothing is read back."""
        n_rows, k = indices.shape
        tokens, d = units.shape[1], units.shape[2]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        rows = torch.div(order, k, rounding_mode="floor")
        weight = gates.reshape(-1)[order]
        experts = torch.arange(self.num_experts, device=flat.device)
        ends = ((flat[:, None] == experts).sum(dim=0).cumsum(0) * tokens).to(torch.int32)
        sorted_expert = flat[order]
        first = self.experts[0]
        dtype = (torch.get_autocast_dtype(units.device.type)
                 if torch.is_autocast_enabled(units.device.type) else units.dtype)

        def layer(x: torch.Tensor, name: str) -> torch.Tensor:
            # E x in x out weights (a stack: the experts keep their own parameters and keys)
            w = torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype)
            y = torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
            if getattr(first, name).bias is not None:
                # one bias row per chosen (row, expert), broadcast over its tokens
                b = torch.stack([getattr(e, name).bias for e in self.experts]).to(dtype)
                y = (y.view(-1, tokens, y.shape[-1]) + b[sorted_expert][:, None]).view(y.shape)
            return y

        # autocast does not cover the op: cast to its dtype as nn.Linear would run
        with torch.autocast(device_type=units.device.type, enabled=False):
            h = layer(units[rows].reshape(-1, d).to(dtype), "fc1")
            h = first.drop1(first.act(h))  # every expert's act/dropout are copies of one
            y = first.drop2(layer(first.norm(h), "fc2"))
        y = y.reshape(n_rows * k, tokens, -1)
        out = y.new_zeros(units.shape[:-1] + y.shape[-1:])
        return out.index_add(0, rows, y * weight.to(y.dtype)[:, None, None])

    def _mix_dense(self, units: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert on every row times its gate (0 where not chosen): static shapes, no
        read-back. Summed in expert order, as the loop, so a row's sum is the same."""
        out: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            # a row picks an expert at most once in its top-k, so this is its gate or 0
            weight = (gates * (indices == e).to(gates.dtype)).sum(dim=-1)
            y = expert(units)
            term = y * weight.to(y.dtype)[:, None, None]
            out = term if out is None else out + term
        assert out is not None  # num_experts >= 1
        return out

    def gate_mass(self, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over rows of each expert's gate (E,), float32, no gradient."""
        mass = torch.zeros(self.num_experts, device=gates.device, dtype=torch.float32)
        return mass.index_add(0, indices.flatten(), gates.detach().float().flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"DEXLayer expects B x N x D tokens, got {tuple(x.shape)}")
        if self._mode == "director":
            return self.director(x)
        probs, gates, indices = self.route(self.router_input(x))
        out = self.mix(x, gates, indices)

        want_director = self.compute_director_out
        if want_director is None:
            want_director = self.training
        director_out = None
        if want_director:
            # before the group EMA below: f_D is the director of the previous step
            with torch.no_grad():
                director_out = self.director(x)

        mass = self.gate_mass(gates, indices)
        count = mass.new_full((1,), float(gates.shape[0]))  # no host-to-device copy per block
        if self.training and torch.is_grad_enabled():
            # one collective for both: every rank gets the whole batch's shares
            total = all_reduce_sum(torch.cat([mass, count]))
            omega = total[:-1] / total[-1]
            if self.defer_updates:
                self._pending_omega = omega.detach()
            else:
                self.apply_updates(omega)
        else:
            omega = mass / count
        self.last = DEXRouting(probs, gates, indices, out, director_out, omega)
        return out

    @torch.no_grad()
    def apply_updates(self, omega: torch.Tensor) -> None:
        """The running gate-mass average ``freq`` and (with ``update_director``) the director's
        group EMA from this step's expert shares ``omega``."""
        self.freq.mul_(self.freq_momentum).add_(omega.to(self.freq.dtype), alpha=1.0 - self.freq_momentum)
        if self.update_director:
            group_ema_(self.director, self.experts, omega, self.director_momentum)

    def discard(self) -> None:
        """Drop the updates of a skipped step (:mod:`midol.utils.deferred`)."""
        self._pending_omega = None

    def commit(self) -> bool:
        """With ``defer_updates``: apply the updates the last training forward computed (call
        after backward, before the optimiser step); False when there were none."""
        omega, self._pending_omega = self._pending_omega, None
        if omega is None:
            return False
        self.apply_updates(omega)
        return True

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"temperature={self.temperature}, token_routing={self.token_routing}, "
            f"dispatch={self.dispatch}"
        )


@torch.no_grad()
def load_mlp_(layer: DEXLayer, mlp: nn.Module) -> None:
    """Copy one MLP's weights into the director and every expert (all experts start equal)."""
    state = mlp.state_dict()
    layer.director.load_state_dict(state, strict=True)
    for expert in layer.experts:
        expert.load_state_dict(state, strict=True)


def inject_dex(model: nn.Module, blocks: list[int] | None = None, **layer_kwargs) -> list[DEXLayer]:
    """Replace ``model.blocks[i].mlp`` (a timm ``Mlp``) by a :class:`DEXLayer` whose director
    and experts are copies of that MLP, for each ``i`` in ``blocks`` (default: every block, as
    DEX). Returns the new layers. Parameter names become ``blocks.i.mlp.director.fc1.weight``,
    ``blocks.i.mlp.experts.r.fc1.weight``, ``blocks.i.mlp.router.weight``.
    """
    if not hasattr(model, "blocks"):
        raise TypeError(f"inject_dex needs a timm VisionTransformer, got {type(model).__name__}")
    indices = list(range(len(model.blocks))) if blocks is None else list(blocks)
    layer_kwargs.setdefault("num_prefix_tokens", getattr(model, "num_prefix_tokens", 1))
    layers = []
    for i in indices:
        block = model.blocks[i]
        mlp = block.mlp
        if isinstance(mlp, DEXLayer):
            raise TypeError(f"block {i} already holds a DEXLayer")
        if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
            raise TypeError(f"block {i}: expected a timm Mlp without norm, got {mlp!r}")
        # the block's own activation object (e.g. tanh-approximate GELU), not just its class
        act = functools.partial(copy.deepcopy, mlp.act)
        layer = DEXLayer(
            mlp.fc1.in_features,
            mlp.fc1.out_features,
            act_layer=act,
            bias=mlp.fc1.bias is not None,
            drop=mlp.drop1.p,
            **layer_kwargs,
        )
        weight = mlp.fc1.weight
        layer.to(device=weight.device, dtype=weight.dtype)
        load_mlp_(layer, mlp)
        block.mlp = layer
        layers.append(layer)
    return layers


_DIRECTOR_KEY = re.compile(r"^(.*\bblocks\.\d+\.mlp\.)director\.(.+)$")
_DEX_ONLY_KEY = re.compile(r"^.*\bblocks\.\d+\.mlp\.(experts\.|router\.|freq$)")


def director_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DEX ViT state dict -> plain timm ViT state dict: ``blocks.i.mlp.director.*`` becomes
    ``blocks.i.mlp.*``; experts, router and ``freq`` are dropped; other keys are kept (a
    prefix such as ``backbone.`` is kept too)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _DIRECTOR_KEY.match(key)
        if match:
            out[match.group(1) + match.group(2)] = value
        elif not _DEX_ONLY_KEY.match(key):
            out[key] = value
    return out


def dex_layers(model: nn.Module) -> list[DEXLayer]:
    """Every DEXLayer in ``model``, in module order (first block first)."""
    return [m for m in model.modules() if isinstance(m, DEXLayer)]


def set_dex_mode(model: nn.Module, mode: DEXMode) -> None:
    """Switch every DEXLayer of ``model`` to ``"experts"`` or ``"director"``."""
    if mode not in _MODES:
        raise ValueError(f"unknown DEX mode {mode!r}; expected one of {_MODES}")
    for layer in dex_layers(model):
        layer.mode = mode


def _check_dispatch(dispatch: str, dim: int, hidden_dim: int) -> None:
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown DEX dispatch {dispatch!r}; expected one of {DISPATCHES}")
    if dispatch == "grouped":
        if not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"DEX dispatch 'grouped' needs torch._grouped_mm (torch {torch.__version__} lacks it)")
        if dim % 8 or hidden_dim % 8:
            raise ValueError(f"DEX dispatch 'grouped' needs dim and hidden_dim divisible by 8, "
                             f"got {dim} and {hidden_dim}")


def set_dex_dispatch(model: nn.Module, dispatch: DEXDispatch) -> None:
    """Set the ``dispatch`` (``loop``, ``sorted``, ``dense`` or ``grouped``) of every
    DEXLayer of ``model``."""
    layers = dex_layers(model)
    for layer in layers:
        _check_dispatch(dispatch, layer.dim, layer.hidden_dim)
    if dispatch not in DISPATCHES:  # a model without DEX layers: still a clear error
        raise ValueError(f"unknown DEX dispatch {dispatch!r}; expected one of {DISPATCHES}")
    for layer in layers:
        layer.dispatch = dispatch
