"""Data parallelism: parameters onto the mesh, DDP gradient all-reduce, and FSDP.

* Plain dp: parameters are replicated over ``dp``; the batch is sharded, so each
  gradient comes out of backward ``Partial`` over dp and :func:`sync_grads` all-reduces
  it (one all-reduce per parameter, in reverse registration order as DDP's buckets go;
  the payloads add up to all parameter bytes).
* FSDP (``fsdp=True``): parameters are stored ``Shard(d)`` over dp. The module that
  owns them gathers them at use (all-gather, forward), runs under activation
  checkpointing so they are re-gathered in backward (all-gather, backward) instead of
  being kept, and the gradient of the gather is a reduce-scatter. All three are
  DTensor redistributions, so they run and are recorded in dry, simulate and run mode.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

import shardlang as sl
from lowering.parallel.tensor import LocalOps
from lowering.plan import Plan
from lowering.schedule import Op, Phase, Recorder, logical, site

__all__ = ["install_fsdp", "sync_grads", "reduce_grad"]


def install_fsdp(model: nn.Module, plan: Plan, dmesh: DeviceMesh) -> None:
    """Make every module that owns an FSDP-sharded parameter gather it at use."""
    if not plan.options.fsdp:
        return
    for mod_name, mod in model.named_modules():
        names = [n for n, p in mod._parameters.items()
                 if p is not None and _is_fsdp(plan, f"{mod_name}.{n}" if mod_name else n)]
        if names:
            _gather_at_use(mod, mod_name, names, dmesh)


def _is_fsdp(plan: Plan, name: str) -> bool:
    aliases = dict(plan.aliases)
    try:
        return plan.param(aliases.get(name, name)).fsdp_dim is not None
    except KeyError:
        return False


def _gathered(pl: tuple[Placement, ...], axes: tuple[str, ...]) -> list[Placement]:
    return [Replicate() if a == "dp" else p for a, p in zip(axes, pl)]


class _Gather(torch.autograd.Function):
    """FSDP's gather of one parameter, with the site of both collectives pinned.

    Forward: all-gather over dp (``Shard`` -> ``Replicate``). Backward: first give the
    gradient the parameter's own placements on every axis but dp (a local slice: an
    embedding's backward, say, yields a tp-replicated grad), then reduce-scatter over dp.
    """

    @staticmethod
    def forward(ctx, p: DTensor, name: str, dmesh: DeviceMesh) -> DTensor:  # noqa: ANN001
        ctx.name, ctx.dmesh, ctx.pl = name, dmesh, tuple(p.placements)
        ctx.axes = tuple(dmesh.mesh_dim_names or ())
        full = _gathered_shape(p, ctx.axes)
        ctx.full = full
        with torch.no_grad(), site(name), logical(Op.ALL_GATHER, full):
            return p.redistribute(dmesh, _gathered(ctx.pl, ctx.axes))

    @staticmethod
    def backward(ctx, g: DTensor):  # noqa: ANN001, ANN205
        with site(ctx.name), logical(Op.REDUCE_SCATTER, ctx.full):
            return reduce_grad(g, ctx.dmesh, ctx.pl), None, None


def _gathered_shape(p: DTensor, axes: tuple[str, ...]) -> list[int]:
    """The block an FSDP gather produces on this rank: ``p``'s block under every axis but
    dp, with the dp-sharded dim padded up to a multiple of dp (as c10d moves it)."""
    shape = list(p.shape)
    for mesh_dim, (a, q) in enumerate(zip(axes, p.placements)):
        if isinstance(q, Shard):
            n = p.device_mesh.size(mesh_dim)
            chunk = -(-shape[q.dim] // n)
            shape[q.dim] = chunk * n if a == "dp" else chunk
    return shape


def _gather_at_use(mod: nn.Module, mod_name: str, names: list[str], dmesh: DeviceMesh) -> None:
    orig: Callable[..., object] = mod.forward

    def run(*args: object, **kwargs: object) -> object:
        for n in names:
            mod.__dict__[n] = _Gather.apply(mod._parameters[n], mod_name, dmesh)
        try:
            return orig(*args, **kwargs)
        finally:
            for n in names:
                mod.__dict__.pop(n, None)

    @functools.wraps(orig)
    def forward(*args: object, **kwargs: object) -> object:
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        ctx = sl.active()

        def rerun(*a: object, **kw: object) -> object:
            # backward recomputes outside the forward: re-enter the lowering context and the
            # local linear, so the recomputed ops are the ones the forward ran
            with (sl.activate(ctx) if ctx else contextlib.nullcontext()), LocalOps():
                return run(*a, **kw)

        # not keeping the gathered weights: backward re-runs `rerun`, gathering again
        return checkpoint(rerun, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    mod.forward = forward  # type: ignore[method-assign]


def reduce_grad(g: DTensor, dmesh: DeviceMesh, target: Sequence[Placement]) -> DTensor:
    """Bring a gradient to its parameter's placements, slicing before reducing: where
    the gradient is replicated but the parameter sharded (an embedding's backward
    yields a tp-replicated gradient), take this rank's block first (no communication),
    so the all-reduce or reduce-scatter over dp moves only that block."""
    target = tuple(target)
    sliced = [t if isinstance(t, Shard) and p.is_replicate() else p
              for p, t in zip(g.placements, target)]
    if tuple(sliced) != tuple(g.placements):
        g = g.redistribute(dmesh, sliced)
    # then one mesh dim at a time, deterministic and one collective each: reduce-scatter
    # where the parameter is sharded (smaller blocks first), all-reduce where replicated
    for want_shard in (True, False):
        for d, (have, want) in enumerate(zip(g.placements, target)):
            if have.is_partial() and isinstance(want, Shard) == want_shard:
                step = list(g.placements)
                step[d] = want
                g = g.redistribute(dmesh, step)
    return g if tuple(g.placements) == target else g.redistribute(dmesh, target)


def sync_grads(model: nn.Module, plan: Plan, dmesh: DeviceMesh, recorder: Recorder | None) -> None:
    """Bring every gradient to its parameter's placements (DDP's all-reduce over dp)."""
    for name, p in reversed(list(model.named_parameters())):
        g = p.grad
        if not isinstance(g, DTensor) or tuple(g.placements) == tuple(p.placements):
            continue
        if recorder is None:
            p.grad = reduce_grad(g, dmesh, p.placements)
            continue
        with recorder.site(name, Phase.BACKWARD):
            p.grad = reduce_grad(g, dmesh, p.placements)

