"""Expert parallelism for Hugging Face MoE layers: the ``"shardlang"`` experts implementation.

HF keeps a layer's experts as 3-D parameters ``[experts, ...]`` (``gate_up_proj``,
``down_proj``) and loops over them in Python, or calls ``grouped_mm``. Registered with
HF's ``ExpertsInterface`` as ``"shardlang"`` (what :func:`models.hf.load` selects), the
experts run as :class:`models.moe.MoE` does, inside one ``sl.shard_map`` region:

1. the router's choices ``(T, K)`` give each token choice a slot in its expert's buffer;
   no choice is ever dropped (capacity ``C = T``: an expert takes each token once at
   most), so the result equals HF's own loop exactly;
2. ``sl.all_to_all`` over ``ep`` sends each expert its tokens ``(X, C, E) -> (X/ep, ep*C, E)``;
3. the local experts run as batched matmuls;
4. ``sl.all_to_all`` sends the results back, and the router's weights mix them.

2 all-to-alls forward, 2 backward per MoE layer. Routing statistics are psum'd over the
token axes and reported as ``moe{layer}.tokens_per_expert``, ``moe{layer}.dropped``
(always 0) and ``moe{layer}.balance`` (X * sum_e f_e * g_e with f the fraction of first
choices and g the mean routing weight per expert: 1.0 when balanced).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import shardlang as sl
from models.moe import TOKEN_AXES, Routing, one_hot, assign_slots

__all__ = ["NAME", "register", "is_experts", "prepare_experts"]

NAME = "shardlang"
_FP32 = 4


def is_experts(mod: nn.Module) -> bool:
    """An HF experts module (3-D expert parameters behind HF's experts interface)."""
    return hasattr(mod, "num_experts") and hasattr(mod, "has_gate") and any(
        p.dim() == 3 for p in mod.parameters(recurse=False))


def _weights(mod: nn.Module) -> list[str]:
    """The expert parameters, in a fixed order: every parameter whose dim 0 is the experts."""
    return [n for n, p in mod.named_parameters(recurse=False) if p.shape[0] == mod.num_experts]


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool
             ) -> torch.Tensor:
    """Per expert: ``(X, N, in) @ w -> (X, N, out)`` (HF stores ``w`` as (out, in), or
    (in, out) when transposed)."""
    y = torch.bmm(x, w if transposed else w.transpose(1, 2))
    return y if b is None else y + b.unsqueeze(1)


def _local(mod: nn.Module, names: list[str], x: torch.Tensor, index: torch.Tensor,
           weights: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One rank's part, in local view: its tokens (T, E), their choices (T, K), its experts."""
    p = dict(zip(names, params))
    T, E = x.shape
    X = mod.num_experts
    r = Routing(expert=index, gate=weights.to(x.dtype), slot=assign_slots(index, X),
                kept=torch.ones_like(index, dtype=torch.bool), capacity=T, n_experts=X)
    buf = torch.einsum("tec,td->ecd", r.dispatch(x.dtype), x)     # (X, C, E)
    buf = sl.all_to_all(buf, "ep", split_dim=0, concat_dim=1)     # (X/ep, ep*C, E): my experts
    t = mod.is_transposed
    if mod.has_gate:
        h = mod._apply_gate(_project(buf, p["gate_up_proj"], p.get("gate_up_proj_bias"), t))
    else:
        h = mod.act_fn(_project(buf, p["up_proj"], p.get("up_proj_bias"), t))
    out = _project(h, p["down_proj"], p.get("down_proj_bias"), t)  # (X/ep, ep*C, E)
    out = sl.all_to_all(out, "ep", split_dim=1, concat_dim=0)     # (X, C, E): my tokens
    y = torch.einsum("tec,ecd->td", r.combine(x.dtype), out)      # (T, E)
    return (y, *_statistics(r, X))


def _statistics(r: Routing, X: int) -> tuple[torch.Tensor, ...]:
    first = one_hot(r.expert[:, 0], X, torch.float32).sum(0)                   # (X,)
    chosen = one_hot(r.expert, X, torch.float32).sum((0, 1))                   # (X,)
    mass = (one_hot(r.expert, X, torch.float32) * r.gate.float().unsqueeze(-1)).sum((0, 1))
    stats = torch.cat([first, chosen, first.new_zeros(1), mass])                # (3X+1,)
    for axis in TOKEN_AXES:
        stats = sl.psum(stats, axis)
    first, chosen, dropped, mass = stats.split([X, X, 1, X])
    tokens = first.sum()
    balance = X * ((first / tokens) * (mass / tokens)).sum()
    return balance, chosen, dropped.reshape(())


def shardlang_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                              top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                              ) -> torch.Tensor:
    """HF's experts forward ``(T, E), (T, K), (T, K) -> (T, E)`` with expert parallelism."""
    if getattr(self, "has_post_expert_norm", False):
        raise sl.ShardingError(
            f"{type(self).__name__} normalises each expert's output (has_post_expert_norm): "
            "shardlang's experts implementation does not support that yet; load the model "
            "with experts_implementation='eager' (no expert parallelism)")
    names = _weights(self)
    params = [getattr(self, n) for n in names]
    axes = [("experts",) + (None,) * (q.dim() - 1) for q in params]
    region = sl.shard_map(
        functools.partial(_local, self, names),
        in_axes=(("batch", "embed"), ("batch", None), ("batch", None), *axes),
        out_axes=(("batch", "embed"), (), (None,), ()))
    y, balance, counts, dropped = region(hidden_states, top_k_index, top_k_weights, *params)
    layer = getattr(self, "_shardlang_layer", 0)
    sl.metric(f"moe{layer}.tokens_per_expert", counts)
    sl.metric(f"moe{layer}.dropped", dropped)
    sl.metric(f"moe{layer}.balance", balance)
    return y.to(hidden_states.dtype)


def _all_to_all_payload(self: nn.Module, local_tokens: int) -> int:
    """Bytes of one dispatch buffer (X, C = T, E): each of the layer's 4 all-to-alls."""
    return self.num_experts * local_tokens * self.hidden_dim * _FP32


def _statistics_payload(self: nn.Module) -> int:
    return (3 * self.num_experts + 1) * _FP32


def register() -> None:
    """Make ``experts_implementation="shardlang"`` known to transformers (idempotent)."""
    ALL_EXPERTS_FUNCTIONS.register(NAME, shardlang_experts_forward)


def prepare_experts(model: nn.Module) -> list[str]:
    """Select shardlang's implementation for every experts module of ``model`` and give
    each its layer number and the payload methods the analytic volumes read; returns
    their paths."""
    register()
    found = []
    for path, mod in model.named_modules():
        if not is_experts(mod):
            continue
        if not hasattr(mod, "hidden_dim"):
            mod.hidden_dim = next(p for p in mod.parameters(recurse=False)).shape[-1]
        digits = re.findall(r"\.(\d+)\.", f".{path}.")
        object.__setattr__(mod, "_shardlang_layer", int(digits[0]) if digits else 0)
        object.__setattr__(mod, "all_to_all_payload", _all_to_all_payload.__get__(mod))
        object.__setattr__(mod, "statistics_payload", _statistics_payload.__get__(mod))
        found.append(path)
    config = getattr(model, "config", None)
    if found and config is not None:
        config._experts_implementation = NAME
        for sub in ("text_config",):
            if hasattr(config, sub):
                getattr(config, sub)._experts_implementation = NAME
    return found
