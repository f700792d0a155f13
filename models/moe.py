"""A mixture-of-experts feed-forward layer in global view, with expert parallelism.

The layer replaces a transformer block's MLP. A router scores every token against
``n_experts`` small MLPs (GELU, like :class:`models.gpt.MLP`); each token goes to its
``top_k`` best experts, and their outputs are mixed by the router's gates. Each expert
takes at most ``capacity`` tokens per rank; a token choice past that is *dropped* (it
contributes 0, and the block's residual carries the token on).

Expert parallelism: the expert weights are 3-D parameters whose first dim is the
logical axis ``experts`` (rules: ``experts -> ep``), so each ep rank holds
``n_experts / ep`` whole experts. Tokens are sharded over (dp, ep) like any dense layer.
Dispatch and combine are explicit, inside one ``sl.shard_map`` region (GShard):

1. route the local tokens and pack a buffer ``(n_experts, C, E)``: slot c of row e is
   the c-th token this rank sends to expert e;
2. ``sl.all_to_all(buf, "ep", split_dim=0, concat_dim=1)`` -> ``(n_experts/ep, ep*C, E)``:
   each rank now holds every rank's tokens for its own experts;
3. run the local experts (one batched matmul per projection);
4. ``sl.all_to_all(out, "ep", split_dim=1, concat_dim=0)`` -> ``(n_experts, C, E)``: the
   results go back to the ranks their tokens came from;
5. mix them with the gates.

That is 2 all-to-alls forward; autograd adds the 2 inverse ones backward. The other
collectives in the region are one ``psum`` per token mesh axis for the global routing
statistics (load-balancing loss, tokens per expert, dropped choices), and, when the
rules put ``mlp`` on tp, the row-parallel ``psum`` over tp inside each expert.

Shapes in comments: B batch, S seq, E embed, T = B*S tokens, X experts, K top_k,
C capacity, F the expert hidden width. Inside the region they are local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import shardlang as sl

__all__ = ["MoE", "Routing", "route", "assign_slots", "capacity", "check_moe_config",
           "TOKEN_AXES", "one_hot"]

#: The mesh axes the tokens are sharded over under the standard rules (batch -> (dp, ep),
#: seq -> sp). Routing statistics are summed over exactly these, so they are global.
TOKEN_AXES: tuple[str, ...] = ("dp", "ep", "sp")


# -- validation ------------------------------------------------------------------------
def _check_experts(n_experts: int) -> None:
    if n_experts < 1:
        raise sl.ShardingError(
            f"MoE with n_experts={n_experts}: an MoE layer needs at least 1 expert; "
            "set n_experts=0 in the config for a dense MLP instead"
        )


def _check_top_k(top_k: int, n_experts: int) -> None:
    if not 1 <= top_k <= n_experts:
        raise sl.ShardingError(
            f"MoE with top_k={top_k} and n_experts={n_experts}: each token picks top_k "
            f"distinct experts, so top_k must be in 1..{n_experts}; lower top_k or add experts"
        )


def _check_capacity_factor(capacity_factor: float) -> None:
    if not capacity_factor > 0:
        raise sl.ShardingError(
            f"MoE with capacity_factor={capacity_factor}: each expert needs at least one "
            "slot; use a capacity factor > 0 (1.0 to 2.0 is usual)"
        )


def check_moe_config(n_experts: int, top_k: int, capacity_factor: float) -> None:
    """Raise a :class:`shardlang.ShardingError` for an MoE layer that cannot work."""
    _check_experts(n_experts)
    _check_top_k(top_k, n_experts)
    _check_capacity_factor(capacity_factor)


# -- routing ---------------------------------------------------------------------------
def capacity(tokens: int, *, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert for ``tokens`` routed tokens: ``ceil(cf * k * T / X)``.

    With ``capacity_factor = n_experts / top_k`` every expert has one slot per token,
    so nothing can drop (a token picks an expert at most once).

    Example:
        >>> capacity(256, n_experts=4, top_k=2, capacity_factor=1.25)
        160
    """
    return max(1, math.ceil(capacity_factor * top_k * tokens / n_experts))


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(...,) -> (..., n)``; an index outside 0..n-1 gives a row of zeros.
    (A comparison rather than ``F.one_hot``, so it also runs on meta tensors.)"""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


@dataclass(frozen=True)
class Routing:
    """Where each of T tokens goes: its K expert choices, best first.

    Attributes:
        expert: ``(T, K)`` int64, the chosen experts.
        gate: ``(T, K)``, the combine weights (see :func:`route`).
        slot: ``(T, K)`` int64, the position of each choice in its expert's buffer.
        kept: ``(T, K)`` bool, ``slot < capacity``; False means the choice was dropped.
        capacity: slots per expert.
        n_experts: number of experts.
    """

    expert: torch.Tensor
    gate: torch.Tensor
    slot: torch.Tensor
    kept: torch.Tensor
    capacity: int
    n_experts: int

    @property
    def dropped(self) -> torch.Tensor:
        """The number of dropped token choices (0-d)."""
        return (~self.kept).sum()

    def _masks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        to_expert = one_hot(self.expert, self.n_experts, dtype)  # (T, K, X)
        to_expert = to_expert * self.kept.unsqueeze(-1)           # dropped choices: zero rows
        to_slot = one_hot(self.slot, self.capacity, dtype)  # (T, K, C): zeros past capacity
        return to_expert, to_slot

    def dispatch(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(T, X, C)`` 0/1: token t fills slot c of expert e."""
        to_expert, to_slot = self._masks(dtype)
        return torch.einsum("tke,tkc->tec", to_expert, to_slot)

    def combine(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(T, X, C)``: the weight of slot c of expert e in token t's output."""
        to_expert, to_slot = self._masks(dtype)
        return torch.einsum("tke,tkc->tec", to_expert * self.gate.unsqueeze(-1), to_slot)


def route(probs: torch.Tensor, top_k: int, capacity: int) -> Routing:
    """Top-k routing with a capacity per expert, GShard/Switch style.

    Gates: with ``top_k == 1`` the gate is the top probability itself (Switch: the router
    then learns from the main loss); with ``top_k >= 2`` the K top probabilities are
    renormalised to sum to 1 (GShard, Mixtral). Priority for the buffer slots: all first
    choices, in token order, before all second choices, and so on; a choice whose
    position reaches ``capacity`` is dropped.

    Args:
        probs: ``(T, X)`` router probabilities (softmax over experts).
        top_k: experts per token.
        capacity: slots per expert.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
        >>> r = route(p, top_k=1, capacity=1)
        >>> r.expert[:, 0].tolist(), r.kept[:, 0].tolist()
        ([0, 1, 0, 1], [True, True, False, False])
    """
    T, X = probs.shape
    gate, expert = probs.topk(top_k, dim=-1)                 # (T, K) each
    if top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    slot = assign_slots(expert, X)
    return Routing(expert=expert, gate=gate, slot=slot, kept=slot < capacity,
                   capacity=capacity, n_experts=X)


def assign_slots(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``(T, K)`` expert choices -> ``(T, K)`` buffer slots: all first choices in token
    order claim their expert's slots before all second choices, and so on."""
    T, K = expert.shape
    chosen = one_hot(expert, n_experts, torch.int64)        # (T, K, X)
    # (K*T, X): every token's 1st choice in token order, then every 2nd choice, ...
    by_priority = chosen.transpose(0, 1).reshape(K * T, n_experts)
    before = by_priority.cumsum(0) - by_priority             # (K*T, X): earlier claims per expert
    slot = (before * by_priority).sum(-1)                    # (K*T,): the claimed expert's count
    return slot.reshape(K, T).transpose(0, 1)                # (T, K)


# -- the layer -------------------------------------------------------------------------
class MoE(nn.Module):
    """Top-k mixture-of-experts feed-forward, ``(B, S, E) -> (B, S, E)``.

    Reports, per forward: the Switch load-balancing loss (``sl.aux_loss``) and the
    metrics ``moe{layer}.tokens_per_expert`` (all K choices per expert, before
    dropping), ``moe{layer}.dropped`` (dropped token choices) and ``moe{layer}.balance``
    (the load-balancing loss before its weight), all global over the mesh.

    Example:
        >>> import torch
        >>> moe = MoE(embed=8, hidden=32, n_experts=4, top_k=2, capacity_factor=2.0)
        >>> moe(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, *, embed: int, hidden: int, n_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.25, aux_weight: float = 0.01, layer: int = 0) -> None:
        super().__init__()
        check_moe_config(n_experts, top_k, capacity_factor)
        self.layer = layer
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor, self.aux_weight = capacity_factor, aux_weight
        self.embed, self.hidden = embed, hidden
        X, E, H = n_experts, embed, hidden
        self.router = nn.Linear(E, X, bias=False)
        sl.axes(self.router.weight, None, "embed")  # replicated: every rank routes its tokens
        self.w_up = nn.Parameter(torch.empty(X, E, H))    # (X, E, F): expert e's up-projection
        self.w_down = nn.Parameter(torch.empty(X, H, E))  # (X, F, E)
        sl.axes(self.w_up, "experts", "embed", "mlp")
        sl.axes(self.w_down, "experts", "mlp", "embed")
        for w in (self.router.weight, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    def capacity(self, local_tokens: int) -> int:
        """Slots per expert when a rank routes ``local_tokens`` tokens."""
        return capacity(local_tokens, n_experts=self.n_experts, top_k=self.top_k,
                        capacity_factor=self.capacity_factor)

    def all_to_all_payload(self, local_tokens: int) -> int:
        """Bytes (fp32) of one dispatch buffer ``(X, C, E)``: the payload of each of the
        layer's 4 all-to-alls per step (dispatch and combine, forward and backward)."""
        return self.n_experts * self.capacity(local_tokens) * self.embed * 4

    def statistics_payload(self) -> int:
        """Bytes (fp32) of the routing statistics psum'd once per token mesh axis
        (first choices, all choices, dropped count, summed probabilities)."""
        return (3 * self.n_experts + 1) * 4

    def routing(self, x: torch.Tensor) -> Routing:
        """Route tokens ``(T, E)`` as this layer would if one rank held exactly these."""
        probs = self.router(x).softmax(-1)  # (T, X)
        return route(probs, self.top_k, self.capacity(x.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # (B, S, X): global view, sharded like x
        moe = sl.shard_map(
            self._dispatch_combine,
            in_axes=(("batch", "seq", "embed"), ("batch", "seq", None),
                     ("experts", "embed", "mlp"), ("experts", "mlp", "embed")),
            out_axes=(("batch", "seq", "embed"), (), (None,), ()),
        )
        y, balance, counts, dropped = moe(x, logits, self.w_up, self.w_down)
        sl.aux_loss(self.aux_weight * balance)
        sl.metric(f"moe{self.layer}.tokens_per_expert", counts)
        sl.metric(f"moe{self.layer}.dropped", dropped)
        sl.metric(f"moe{self.layer}.balance", balance)
        return y

    def _dispatch_combine(self, x: torch.Tensor, logits: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One rank's part, in local view: its tokens, its experts."""
        B, S, E = x.shape
        X, T = self.n_experts, B * S
        probs = logits.reshape(T, X).softmax(-1)           # (T, X)
        r = route(probs, self.top_k, self.capacity(T))
        buf = torch.einsum("tec,td->ecd", r.dispatch(x.dtype), x.reshape(T, E))  # (X, C, E)
        buf = sl.all_to_all(buf, "ep", split_dim=0, concat_dim=1)  # (X/ep, ep*C, E): my experts
        h = F.gelu(torch.bmm(buf, w_up))                   # (X/ep, ep*C, F/tp)
        out = torch.bmm(h, w_down)                         # (X/ep, ep*C, E)
        if w_up.shape[-1] != self.hidden:
            # mlp is split inside each expert (rules: mlp -> tp): the down-projection is
            # row-parallel and its output a partial sum over tp
            out = sl.psum(out, "tp")
        out = sl.all_to_all(out, "ep", split_dim=1, concat_dim=0)  # (X, C, E): my tokens
        y = torch.einsum("tec,ecd->td", r.combine(x.dtype), out).reshape(B, S, E)  # (B, S, E)
        return (y, *self._statistics(r, probs))

    def _statistics(self, r: Routing, probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Global routing statistics: one psum per token mesh axis, all packed together."""
        X = self.n_experts
        first = one_hot(r.expert[:, 0], X, probs.dtype).sum(0)      # (X,) first choices
        chosen = one_hot(r.expert, X, probs.dtype).sum((0, 1))      # (X,) all K choices
        dropped = r.dropped.to(probs.dtype).reshape(1)               # (1,)
        stats = torch.cat([first, chosen, dropped, probs.sum(0)])    # (3X+1,)
        for axis in TOKEN_AXES:
            stats = sl.psum(stats, axis)
        first, chosen, dropped, prob_sum = stats.split([X, X, 1, X])
        tokens = first.sum()                                          # global token count
        # Switch Transformer: X * sum_e f_e * P_e, f = fraction of first choices (no
        # gradient), P = mean router probability; 1.0 when perfectly balanced.
        balance = X * ((first / tokens) * (prob_sum / tokens)).sum()
        return balance, chosen, dropped.reshape(())
