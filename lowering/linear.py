"""``F.linear`` on DTensors without folding sharded dims.

ATen computes a linear on a (batch, seq, features) input as one matrix multiply over
(batch*seq) rows. When batch and seq are split over two different mesh axes, the
folded dim carries a strided shard, and DTensor then costs every candidate layout with
its exhaustive redistribution planner: minutes per op on a 3-D mesh. Megatron's rules
say what the result must be, so we compute it on the local blocks instead, per mesh dim:

| input x            | weight w          | output y      | grad x   | grad w   |
|--------------------|-------------------|---------------|----------|----------|
| Shard(d), d < last | Replicate         | Shard(d)      | Shard(d) | Partial  |
| Replicate          | Shard(0) (column) | Shard(last)   | Partial  | Shard(0) |
| Shard(last)        | Shard(1) (row)    | Partial       | Shard    | Shard(1) |
| Replicate          | Replicate         | Replicate     | -        | -        |

Any other combination (a Partial input, one mesh dim splitting x and w both ways) goes
to DTensor as before. A row-parallel bias is added after the local product, by
DTensor, so it is added once and not once per rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.overrides import TorchFunctionMode

from lowering.placements import contiguous_stride

__all__ = ["LocalLinear"]


def _plan(x: DTensor, w: DTensor) -> tuple[list[Placement], list[Placement], list[Placement]] | None:
    """(output, grad-x, grad-w) placements per mesh dim, or None to leave it to DTensor."""
    last = x.dim() - 1
    y_pl: list[Placement] = []
    gx: list[Placement] = []
    gw: list[Placement] = []
    for px, pw in zip(x.placements, w.placements):
        if isinstance(px, Shard) and px.dim < last and pw.is_replicate():
            y_pl.append(px), gx.append(px), gw.append(Partial())
        elif px.is_replicate() and isinstance(pw, Shard) and pw.dim == 0:
            y_pl.append(Shard(last)), gx.append(Partial()), gw.append(pw)
        elif isinstance(px, Shard) and px.dim == last and isinstance(pw, Shard) and pw.dim == 1:
            y_pl.append(Partial()), gx.append(px), gw.append(pw)
        elif px.is_replicate() and pw.is_replicate():
            y_pl.append(Replicate()), gx.append(Replicate()), gw.append(Replicate())
        else:
            return None
    return y_pl, gx, gw


def _linear(x: DTensor, w: DTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    if w.dim() != 2 or x.dim() < 2 or x.device_mesh != w.device_mesh:
        return None
    plan = _plan(x, w)
    if plan is None:
        return None
    y_pl, gx, gw = plan
    y_local = F.linear(x.to_local(grad_placements=gx), w.to_local(grad_placements=gw))
    shape = torch.Size((*x.shape[:-1], w.shape[0]))
    y = DTensor.from_local(y_local, x.device_mesh, y_pl, run_check=False, shape=shape,
                           stride=contiguous_stride(shape))
    return y if bias is None else y + bias


class LocalLinear(TorchFunctionMode):
    """While active, ``F.linear`` on DTensors follows the table in this module's doc."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, DTensor) and isinstance(w, DTensor) and (
                    bias is None or isinstance(bias, DTensor)):
                out = _linear(x, w, bias)
                if out is not None:
                    return out
        return func(*args, **kwargs)
