"""Expert parallelism (``ep``): experts sharded over ``ep``, tokens moved to them and back
with all-to-alls.

| piece                       | forward                                   | backward                    |
|-----------------------------|-------------------------------------------|-----------------------------|
| expert weights              | ``Shard(0)`` over ep (whole experts), replicated over dp | grads reduced over dp only |
| dispatch ``sl.all_to_all``  | each rank's (experts, capacity, embed) buffer: block j to ep rank j | the inverse all-to-all |
| combine ``sl.all_to_all``   | the experts' outputs back to their tokens' ranks | the inverse all-to-all |
| dense layers                | ep is more data parallelism (``batch -> (dp, ep)``) | gradient all-reduce over ep |

An MoE layer (``models/moe.py``) calls ``sl.all_to_all`` twice inside its
``sl.shard_map`` region; autograd adds the two inverse all-to-alls: 2 + 2 per MoE layer
per step, each moving (n-1)/n of the dispatch buffer.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from lowering._torch import all_to_all_single, wait
from lowering.schedule import Op, Recorder

__all__ = ["all_to_all"]


def _all_to_all(x: torch.Tensor, sub: DeviceMesh, s: int, c: int,
                recorder: Recorder | None) -> torch.Tensor:
    """One all_to_all_single: block j of ``x`` along ``s`` goes to rank j; the blocks that
    arrive are concatenated along ``c`` in source-rank order. (A DTensor Shard -> Shard
    redistribution would do the same, but on CPU process groups torch falls back to an
    all-gather and a slice, which moves n times the bytes.)"""
    n = sub.size()
    xs = x.movedim(s, 0).contiguous()                  # (S, *rest): rows for rank j in block j
    if recorder is None:
        out = all_to_all_single(xs, None, None, sub.get_group())
    else:
        with recorder.explicit(Op.ALL_TO_ALL, shape=tuple(x.shape)):
            out = all_to_all_single(xs, None, None, sub.get_group())
    out = wait(out)
    blocks = out.unflatten(0, (n, xs.shape[0] // n))   # (n, S/n, *rest): block i from rank i
    blocks = blocks.movedim(1, s + 1)                  # (n, *x.shape with dim s = S/n)
    return blocks.movedim(0, c).flatten(c, c + 1)      # concatenated along c


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all (split ``s``, concatenate ``c``). Backward: the inverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sub: DeviceMesh, s: int, c: int,  # noqa: ANN001
                recorder: Recorder | None) -> torch.Tensor:
        ctx.sub, ctx.s, ctx.c, ctx.recorder = sub, s, c, recorder
        return _all_to_all(x, sub, s, c, recorder)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        return _all_to_all(g.contiguous(), ctx.sub, ctx.c, ctx.s, ctx.recorder), None, None, None, None


def all_to_all(x: torch.Tensor, sub: DeviceMesh, split_dim: int, concat_dim: int,
               recorder: Recorder | None) -> torch.Tensor:
    """``sl.all_to_all`` on a rank's local block over the one-dimensional mesh ``sub``:
    split along ``split_dim``, block j to rank j, concatenate along ``concat_dim``
    (backward: the inverse)."""
    return _AllToAll.apply(x, sub, split_dim, concat_dim, recorder)
