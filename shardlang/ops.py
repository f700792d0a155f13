"""Model-side calls: activation constraints, attention, shard_map and its collectives.

Every call here has single-device semantics when no lowering context is active (see
:mod:`shardlang.context`): ``constrain`` and the collectives are the identity and
``shard_map`` calls the function on the whole tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from shardlang.context import Comm, MapAxes, active
from shardlang.errors import ShardingError
from shardlang.mesh import check_mesh_axis
from shardlang.rules import Axes

__all__ = [
    "constrain", "attention", "shard_map", "positions", "axis_index",
    "psum", "all_gather", "psum_scatter", "all_to_all", "ppermute",
]

_F = TypeVar("_F", bound=Callable[..., object])


def _check_rank(x: torch.Tensor, names: Axes, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ShardingError(f"{what} takes a tensor, got {type(x).__name__}")
    if len(names) != x.dim():
        raise ShardingError(
            f"{what}: tensor of shape {tuple(x.shape)} has {x.dim()} dims but "
            f"{len(names)} logical axes {names} were given; give one per dim"
        )


def constrain(x: torch.Tensor, *names: str | None) -> torch.Tensor:
    """Say how an activation is laid out: one logical axis (or None) per dim.

    Under a plan the activation is redistributed to the spec the rules give (this is
    where Megatron's all-reduce after a row-parallel linear, or Megatron-SP's
    reduce-scatter, is issued; in backward the gradient is converted back). On one
    device it returns ``x`` unchanged.

    Example:
        >>> import torch, shardlang as sl
        >>> x = torch.ones(2, 3, 4)
        >>> sl.constrain(x, "batch", "seq", "embed") is x
        True
    """
    _check_rank(x, names, "constrain")
    ctx = active()
    return x if ctx is None else ctx.constrain(x, names)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, mask: torch.Tensor | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on ``(batch, heads, seq, head_dim)`` tensors.

    Under a plan, batch and heads may be sharded (each rank attends over its own heads);
    the computation runs on each rank's local block, since attention is independent per
    batch row and head. ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query
    attention: each key/value head serves ``q_heads / kv_heads`` query heads); under
    ``tp`` the key/value heads are split too, so tp must divide them.

    ``mask`` (broadcastable to ``(batch, heads, q_seq, k_seq)``; bool True or float 0.0:
    attend, a float adds to the scores; it replaces ``causal``) and ``softcap`` (scores
    become ``softcap * tanh(scores / softcap)``) compute the scores in global view:
    exact under every layout, with a sequence split over sp gathered there. So does
    ``causal`` with fewer queries than keys (queries after a key/value cache: the last
    query attends to every key).

    Example:
        >>> import torch, shardlang as sl
        >>> q = torch.randn(1, 2, 4, 8)
        >>> sl.attention(q, q, q, causal=True).shape
        torch.Size([1, 2, 4, 8])
        >>> keep = torch.ones(4, 4, dtype=torch.bool).tril()
        >>> torch.allclose(sl.attention(q, q, q, mask=keep), sl.attention(q, q, q, causal=True))
        True
    """
    for t in (q, k, v):
        _check_rank(t, ("batch", "heads", "seq", None), "attention")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ShardingError(
            f"attention: {q.shape[1]} query heads and {k.shape[1]} key / {v.shape[1]} value "
            "heads; grouped-query attention needs as many key as value heads, dividing the "
            "query heads")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ShardingError(f"attention(mask=...) takes a tensor, got {type(mask).__name__}")
    ctx = active()
    late = causal and mask is None and q.shape[2] != k.shape[2]  # queries after a cache
    if softcap or late or (mask is not None and ctx is not None):
        return _global_view(q, k, v, mask=mask, causal=causal, scale=scale, softcap=softcap)
    if ctx is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return ctx.attention(q, k, v, causal=causal, scale=scale)


def _global_view(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 mask: torch.Tensor | None, causal: bool, scale: float | None,
                 softcap: float | None) -> torch.Tensor:
    """Scores, mask (or the causal one), softmax in fp32, times the values: plain tensor
    ops, which a plan runs on DTensors as they are laid out."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale                          # (b, h, q, k)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask[..., : k.shape[-2]]
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    elif causal:
        n_q, n_k = scores.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def shard_map(fn: _F, *, in_axes: Sequence[Axes | None], out_axes: MapAxes) -> _F:
    """Run ``fn`` in local view: each rank sees its own block of every input.

    ``in_axes`` gives the logical axes of each positional argument (None for a
    non-tensor argument); ``out_axes`` those of the output (or a tuple of them for a
    tuple output). Inside, the collectives below are explicit. An output that still
    varies over a mesh axis its out_axes do not shard is an error (psum it, or shard it).
    With no plan, ``fn`` runs on the whole tensors.

    Example:
        >>> import torch, shardlang as sl
        >>> f = sl.shard_map(lambda x: sl.psum(x * 2, "tp"), in_axes=(("batch", "mlp"),),
        ...                  out_axes=("batch", None))
        >>> f(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    @functools.wraps(fn)
    def mapped(*args: object) -> object:
        if len(args) != len(in_axes):
            raise ShardingError(
                f"shard_map({getattr(fn, '__name__', fn)}) got {len(args)} arguments but "
                f"{len(in_axes)} in_axes; give one entry per positional argument"
            )
        ctx = active()
        return fn(*args) if ctx is None else ctx.shard_map(fn, in_axes, out_axes, args)

    return mapped  # type: ignore[return-value]


def positions(n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions 0..n-1 of a sequence of length n, in the order its tokens are laid
    out. On one device (and for contiguous sequence sharding) that is ``arange(n)``;
    with load-balanced causal sharding the lowering reorders the tokens and this
    returns the positions in that order. Use it for position embeddings and rotary.

    Example:
        >>> import shardlang as sl
        >>> sl.positions(4).tolist()
        [0, 1, 2, 3]
    """
    ctx = active()
    if ctx is None:
        return torch.arange(n, device=device)
    return ctx.positions(n, device)


def axis_index(axis: str) -> torch.Tensor:
    """This rank's position along a mesh axis, as a 0-d integer tensor (local view).

    On one device it is 0. Inside ``shard_map`` each rank gets its own value, so code
    that depends on it (a causal mask across sequence blocks) stays one program.
    """
    check_mesh_axis(axis, where="sl.axis_index")
    ctx = active()
    return torch.tensor(0) if ctx is None else ctx.axis_index(axis)


def _collective(comm: Comm, x: torch.Tensor, axis: str, **kw: int) -> torch.Tensor:
    check_mesh_axis(axis, where=f"sl.{comm.value}")
    if not isinstance(x, torch.Tensor):
        raise ShardingError(f"sl.{comm.value} takes a tensor, got {type(x).__name__}")
    ctx = active()
    return x if ctx is None else ctx.collective(comm, x, axis, **kw)


def psum(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``axis`` (all-reduce).

    Forward: all-reduce (sum); the result is the same on every rank of ``axis``.
    Backward: identity (the result is replicated, so each rank already holds the whole
    cotangent of its own summand).
    """
    return _collective(Comm.PSUM, x, axis)


def all_gather(x: torch.Tensor, axis: str, *, dim: int) -> torch.Tensor:
    """Concatenate the blocks of ``x`` held by the ranks of ``axis`` along ``dim``.

    Forward: all-gather; the result is the same on every rank of ``axis``.
    Backward: each rank keeps its own block of the (replicated) cotangent; no
    communication.
    """
    return _collective(Comm.ALL_GATHER, x, axis, dim=dim)


def psum_scatter(x: torch.Tensor, axis: str, *, dim: int) -> torch.Tensor:
    """Sum ``x`` over ``axis`` and keep this rank's block along ``dim`` (reduce-scatter).

    Forward: reduce-scatter (sum). Backward: all-gather of the cotangent along ``dim``.
    """
    return _collective(Comm.PSUM_SCATTER, x, axis, dim=dim)


def all_to_all(x: torch.Tensor, axis: str, *, split_dim: int, concat_dim: int) -> torch.Tensor:
    """Split ``x`` along ``split_dim`` into one block per rank of ``axis``, send block j to
    rank j, and concatenate what arrives along ``concat_dim``.

    Forward: all-to-all. Backward: the inverse all-to-all (split along ``concat_dim``,
    concatenate along ``split_dim``).
    """
    return _collective(Comm.ALL_TO_ALL, x, axis, split_dim=split_dim, concat_dim=concat_dim)


def ppermute(x: torch.Tensor, axis: str, *, shift: int = 1) -> torch.Tensor:
    """Collective permute: rank i of ``axis`` sends ``x`` to rank (i + shift) mod n.

    Forward: each rank sends one block to one peer and receives one.
    Backward: the inverse permute (shift by ``-shift``).
    """
    return _collective(Comm.PPERMUTE, x, axis, shift=shift)
