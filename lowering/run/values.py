"""Values across ranks, for a user's own loop: a scalar's global value, the global
gradient norm, and one global tensor from each rank's own block."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import shardlang as sl
from lowering.parallel import DTensorContext
from lowering.schedule import Recorder

__all__ = ["global_item", "clip_grad_norm", "from_blocks"]


def global_item(t: DTensor, rec: Recorder | None) -> object:
    """``t.item()`` of the global value (a ``Partial`` loss is reduced first; the reduction
    is bookkeeping, not part of the step's schedule). Every rank must ask, as for any
    collective."""
    full = t.full_tensor() if rec is None else _unrecorded_full(t, rec)
    return full.item()


def _unrecorded_full(t: DTensor, rec: Recorder) -> torch.Tensor:
    with rec.paused():
        return t.full_tensor()


def clip_grad_norm(params: Sequence[nn.Parameter], dmesh: DeviceMesh | None, max_norm: float,
                   norm_type: float = 2.0, *, uncounted: Sequence[nn.Parameter] = (),
                   pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale the gradients of ``params`` (DTensors) in place so that their norm over the
    whole mesh is at most ``max_norm``; returns the norm. Each gradient adds its local
    block's share; shares are summed over the mesh axes that shard them (one all-reduce
    per distinct set of sharding axes, never per parameter). A pipeline stage's process
    also sums over ``pp_group``, counting the parameters every stage holds only on the
    first (``uncounted`` on the others: they are scaled but not counted)."""
    norm_type = float(norm_type)
    if not (norm_type > 0 or norm_type == math.inf):
        raise sl.ShardingError(f"clip_grad_norm_(norm_type={norm_type}): use a norm > 0 or inf")
    shares: dict[tuple[int, ...], torch.Tensor] = {}
    skip = {id(p) for p in uncounted}
    for p in params:
        if id(p) in skip:
            continue
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        if isinstance(g, DTensor) and any(q.is_partial() for q in g.placements):
            raise sl.ShardingError(
                f"clip_grad_norm_ found an unreduced gradient (placements {g.placements}); "
                "call it after backward and outside no_sync()")
        key = tuple(i for i, q in enumerate(g.placements) if isinstance(q, Shard)) \
            if isinstance(g, DTensor) else ()
        a = local.detach().float().abs()
        share = a.max() if norm_type == math.inf else a.pow(norm_type).sum()
        if key in shares:
            shares[key] = torch.maximum(shares[key], share) if norm_type == math.inf \
                else shares[key] + share
        else:
            shares[key] = share
    op = "max" if norm_type == math.inf else "sum"
    parts = []
    for key, share in shares.items():
        if dmesh is None:
            parts.append(share)
            continue
        pl = [Partial(op) if i in key else Replicate() for i in range(dmesh.ndim)]
        parts.append(DTensor.from_local(share, dmesh, pl, run_check=False).full_tensor())
    if not parts and pp_group is None:
        return torch.zeros(())
    device = params[0].grad.device if params else torch.device("cpu")
    agg = (torch.stack(parts).max() if norm_type == math.inf else torch.stack(parts).sum()) \
        if parts else torch.zeros((), device=device)
    if pp_group is not None:
        agg = agg.clone()
        dist.all_reduce(agg, op=dist.ReduceOp.MAX if norm_type == math.inf else
                        dist.ReduceOp.SUM, group=pp_group)
    total = agg if norm_type == math.inf else agg.pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            g = p.grad
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


def from_blocks(ctx: DTensorContext, x: torch.Tensor, axes: sl.Axes) -> DTensor:
    """One global tensor from every rank's block ``x`` laid out as ``axes`` say."""
    spec = ctx.rules.spec(axes, where=f"the input {axes}")
    shape = [n * math.prod(ctx.mesh.axis_size(a) for a in spec.axes_of(d))
             for d, n in enumerate(x.shape)]
    _, pl = ctx.layout(shape, axes, f"input {axes}")
    return DTensor.from_local(x, ctx.dmesh, pl, run_check=False)
