"""Parameters at use: FSDP's gather (without recompute) and mixed precision's cast.

A module that owns parameters runs with what its parameters *become at use*:

| | forward | backward |
|---|---|---|
| FSDP (``fsdp=True``) | all-gather over dp (``Shard`` -> ``Replicate``) when the module starts; the gathered memory is freed when its last owner's forward ends | before the module's backward (a hook on its outputs) the freed parameters are all-gathered again into the same memory; the gradient of the gather is a reduce-scatter over dp |
| ``precision="bf16"`` | the fp32 (master) parameter is cast to bf16 (under FSDP: the shard, so the gather moves bf16) | the gradient is cast back to fp32 before any reduction |

No forward runs twice: autograd keeps what the module's ops saved (views of the gathered
memory), only the memory goes away between forward and backward, as FSDP2 does. A
parameter is gathered once per forward however many modules own it (tied embeddings), so
the dp wire is exactly all-gather + all-gather + reduce-scatter = 3(n-1)/n of the
parameter bytes, root-level parameters included. All of it is DTensor redistributions, so
it runs and is recorded in dry, simulate and run mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from lowering._torch import (free_storage, local_block, refill_storage, storage_blocks,
                             tree_leaves)
from lowering.parallel.data import reduce_grad, sliced_first
from lowering.parallel.flat import cast_to, dp_dim, gather_flat, reduce_scatter_flat
from lowering.plan import Plan, fsdp_units
from lowering.schedule import Op, logical, site

__all__ = ["install_at_use", "compute_dtype", "gathered_storages", "gathered_peak", "local_view",
           "is_gathered", "partial_over"]


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype parameters are cast to at use (None: they run as stored)."""
    return torch.bfloat16 if str(precision) == "bf16" else None


def _gathered(pl: tuple[Placement, ...], axes: tuple[str, ...]) -> list[Placement]:
    return [Replicate() if a == "dp" else p for a, p in zip(axes, pl)]


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


def _all_gather(p: DTensor, name: str, dtype: torch.dtype | None) -> DTensor:
    axes = tuple(p.device_mesh.mesh_dim_names or ())
    with torch.no_grad(), site(name), logical(Op.ALL_GATHER, _gathered_shape(p, axes)):
        src = p if dtype is None or p.dtype == dtype else p.to(dtype)
        return src.redistribute(p.device_mesh, _gathered(tuple(p.placements), axes))


class _Gather(torch.autograd.Function):
    """FSDP's gather of one parameter. Forward: (cast and) all-gather over dp. Backward:
    the gradient back in the parameter's dtype, given the parameter's own placements on
    every axis but dp (a local slice), then reduce-scattered over dp."""

    @staticmethod
    def forward(ctx, p: DTensor, name: str, dtype: torch.dtype | None) -> DTensor:  # noqa: ANN001
        ctx.name, ctx.pl, ctx.dtype = name, tuple(p.placements), p.dtype
        ctx.full = _gathered_shape(p, tuple(p.device_mesh.mesh_dim_names or ()))
        return _all_gather(p, name, dtype)

    @staticmethod
    def backward(ctx, g: DTensor):  # noqa: ANN001, ANN205
        g = g.to(ctx.dtype)
        with site(ctx.name), logical(Op.REDUCE_SCATTER, ctx.full):
            return reduce_grad(g, g.device_mesh, ctx.pl), None, None


class _UnitGather(torch.autograd.Function):
    """FSDP's gather of one unit (a layer of the stack, :mod:`lowering.plan.units`): one
    all-gather for all its parameters; backward: one reduce-scatter for the gradients
    that are dp-partial sums (a member with no gradient, unused by the forward, gets
    none, as it would alone)."""

    @staticmethod
    def forward(ctx, name: str, dtype: torch.dtype | None, dims: tuple[int, ...],  # noqa: ANN001
                *params: DTensor) -> tuple[DTensor, ...]:
        ctx.name, ctx.dims = name, dims
        ctx.pls = [tuple(p.placements) for p in params]
        ctx.dtypes = [p.dtype for p in params]
        ctx.set_materialize_grads(False)
        return tuple(gather_flat(params, dims, name, dtype))

    @staticmethod
    def backward(ctx, *grads: DTensor | None):  # noqa: ANN001, ANN205
        out: list[DTensor | None] = [None] * len(grads)
        flat: list[tuple[int, DTensor]] = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            mesh = g.device_mesh
            g = sliced_first(g.to(ctx.dtypes[i]), mesh, ctx.pls[i])
            if g.placements[dp_dim(mesh)] == Partial():
                flat.append((i, g))
            else:  # replicated over dp (now this rank's block): nothing to sum over dp
                with site(ctx.name):
                    out[i] = reduce_grad(g, mesh, ctx.pls[i])
        if flat:
            shards = reduce_scatter_flat([g for _, g in flat], [ctx.dims[i] for i, _ in flat],
                                         ctx.name)
            for (i, g), shard in zip(flat, shards):
                with site(ctx.name):
                    out[i] = reduce_grad(shard, g.device_mesh, ctx.pls[i])
            # the gradients are views of one reduce-scatter buffer; where some were reduced
            # on (over tp or ep) into new memory, copy the rest out so the buffer is freed
            buffer = _storages(shards[0])
            kept = [i for i, _ in flat if _storages(out[i]) & buffer]  # type: ignore[arg-type]
            if len(kept) < len(flat):
                for i in kept:
                    out[i] = out[i].clone()  # type: ignore[union-attr]
        return (None, None, None, *out)


class _Gathers:
    """One model's gathered parameters: those of the running forward (with how many owner
    modules have yet to use them) and those freed, waiting for their backward."""

    def __init__(self, owners: dict[int, int], dtype: torch.dtype | None,
                 units: dict[int, tuple[str, list[tuple[DTensor, int]]]] | None = None) -> None:
        self.owners, self.dtype = owners, dtype
        self.units = units or {}  # id(param) -> (its unit, the unit's (param, dim) pairs)
        self.together: dict[int, tuple[str, list[tuple[DTensor, int]], tuple[DTensor, ...]]] = {}
        self.live: dict[int, tuple[DTensor, int]] = {}   # id(param) -> (gathered, uses left)
        self.freed: dict[int, DTensor] = {}              # id(gathered) -> it, freed
        self.held = self.peak = 0                        # bytes gathered at once (a rank's)
        self.issued = 0                                  # gathers issued in forwards so far
        self.local = False  # a batch-local forward (local_dp): modules read local views

    def take(self, p: DTensor, name: str) -> DTensor:
        if id(p) in self.live:
            return self.live[id(p)][0]
        unit, members = self.units.get(id(p), (None, []))
        if unit is None or any(id(q) in self.live for q, _ in members):
            self._hold(p, _Gather.apply(p, name, self.dtype))
        else:  # the whole unit in one collective
            outs = _UnitGather.apply(unit, self.dtype, tuple(d for _, d in members),
                                     *(q for q, _ in members))
            for (q, _), g in zip(members, outs):
                self._hold(q, g)
                if torch.is_grad_enabled():
                    self.together[id(g)] = (unit, members, outs)
        self.issued += 1
        return self.live[id(p)][0]

    def _hold(self, p: DTensor, g: DTensor) -> None:
        g._shardlang_gathered = True  # type: ignore[attr-defined]  # (see is_gathered)
        self.live[id(p)] = (g, self.owners[id(p)])
        self.held += _local_bytes(g)
        self.peak = max(self.peak, self.held)

    def release(self, p: DTensor, *, keep_for_backward: bool) -> None:
        g, left = self.live[id(p)]
        if left > 1:
            self.live[id(p)] = (g, left - 1)
            return
        del self.live[id(p)]
        self._free(g, keep_for_backward)

    def release_all(self, *, keep_for_backward: bool) -> None:
        """The model's forward ended: a parameter whose other owners did not run (a
        pipeline chunk runs part of the model) is freed now."""
        for key, (g, _) in list(self.live.items()):
            del self.live[key]
            self._free(g, keep_for_backward)

    def _free(self, g: DTensor, keep_for_backward: bool) -> None:
        self.held -= _local_bytes(g)
        if keep_for_backward:  # autograd saved views of it: free the memory, keep the tensor
            free_storage(g)
            self.freed[id(g)] = g

    def regather(self, p: DTensor, g: DTensor, name: str) -> None:
        """Before the backward of the forward that used ``g``: gather ``p`` into it again
        (once, whichever of its owners' backward comes first; a unit whole, in one
        collective, when all of it was freed)."""
        unit, members, outs = self.together.pop(id(g), (None, [], ()))
        if unit is not None and all(id(x) in self.freed for x in outs):
            for x in outs:
                self.together.pop(id(x), None)
                del self.freed[id(x)]
            values = gather_flat([q for q, _ in members], [d for _, d in members], unit,
                                 self.dtype)
            for x, v in zip(outs, values):
                refill_storage(x, v)
        elif self.freed.pop(id(g), None) is not None:
            refill_storage(g, _all_gather(p, name, self.dtype))


def is_gathered(t: object) -> bool:
    """``t`` is a parameter as FSDP gathered it (its gradient is reduce-scattered by the
    gather's backward, so it may arrive as a partial sum over dp)."""
    return getattr(t, "_shardlang_gathered", False)


def partial_over(t: DTensor, axis: str) -> tuple[Placement, ...]:
    """``t``'s placements with ``axis``'s mesh dim Partial (the gradient placements of a
    local view whose gradient is this rank's share over ``axis``)."""
    names = t.device_mesh.mesh_dim_names or ()
    return tuple(Partial() if n == axis and pl.is_replicate() else pl
                 for n, pl in zip(names, t.placements))


def local_view(t: DTensor) -> torch.Tensor:
    """``t``'s local tensor for a batch-local forward (:mod:`.local_dp`): its gradient goes
    back to ``t`` as a partial sum over each mesh dim ``t`` is replicated on (this rank's
    rows' share), what the same forward on DTensors yields."""
    if not (torch.is_grad_enabled() and t.requires_grad):
        return t.to_local()
    mesh = t.device_mesh
    return t.to_local(grad_placements=tuple(
        Partial() if pl.is_replicate() and mesh.size(d) > 1 else pl
        for d, pl in enumerate(t.placements)))


def _storages(t: DTensor) -> set[int]:
    return {key for _, key, _ in storage_blocks(t)}


def _local_bytes(g: DTensor) -> int:
    return local_block(g).numel() * g.element_size()


def gathered_storages(model: nn.Module) -> set[int]:
    """The storage identities of ``model``'s FSDP-gathered parameters now in use."""
    gathers = getattr(model, "_shardlang_gathers", None)
    if gathers is None:
        return set()
    return {key for g, _ in gathers.live.values() for _, key, _ in storage_blocks(g)}


def gathered_peak(model: nn.Module) -> int:
    """The most bytes of FSDP-gathered parameters one rank held at once in a forward."""
    gathers = getattr(model, "_shardlang_gathers", None)
    return gathers.peak if gathers is not None else 0


def install_at_use(model: nn.Module, plan: Plan | None, dmesh: DeviceMesh | None, *,
                   dtype: torch.dtype | None = None) -> None:
    """Make every module that owns an FSDP-sharded parameter gather it at use, and (with
    ``dtype``) every module cast its floating-point parameters to ``dtype`` at use."""
    fsdp = plan is not None and dmesh is not None and plan.options.fsdp
    owned: dict[str, tuple[nn.Module, list[str], list[str]]] = {}
    owners: dict[int, int] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        sharded, cast = [], []
        for n, p in mod._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{n}" if mod_name else n
            if fsdp and _is_fsdp(plan, full):  # type: ignore[arg-type]
                sharded.append(n)
                owners[id(p)] = owners.get(id(p), 0) + 1
            elif dtype is not None and p.is_floating_point():
                cast.append(n)
        if sharded or cast:
            owned[mod_name] = (mod, sharded, cast)
    gathers = _Gathers(owners, dtype, _units(model, plan) if fsdp else None)
    for mod_name, (mod, sharded, cast) in owned.items():
        _wrap(mod, mod_name, sharded, cast, gathers, dtype)
    if owners:
        model._shardlang_gathers = gathers  # type: ignore[assignment]
        inner: Callable[..., object] = model.forward

        @functools.wraps(inner)
        def forward(*args: object, **kwargs: object) -> object:
            grad = torch.is_grad_enabled()
            try:
                return inner(*args, **kwargs)
            finally:
                gathers.release_all(keep_for_backward=grad)

        model.forward = forward  # type: ignore[method-assign]


def _units(model: nn.Module, plan: Plan) -> dict[int, tuple[str, list[tuple[DTensor, int]]]]:
    """id(parameter) -> its FSDP unit and the unit's (parameter, sharded dim) pairs."""
    table, aliases = fsdp_units(plan, model), dict(plan.aliases)
    members: dict[str, list[tuple[DTensor, int]]] = {}
    for name, p in model.named_parameters():
        unit = table.get(aliases.get(name, name))
        if unit is not None:
            members.setdefault(unit, []).append((p, plan.param(aliases.get(name, name)).fsdp_dim))
    return {id(p): (u, ms) for u, ms in members.items() for p, _ in ms}


def _is_fsdp(plan: Plan, name: str) -> bool:
    aliases = dict(plan.aliases)
    try:
        return plan.param(aliases.get(name, name)).fsdp_dim is not None
    except KeyError:
        return False


def _wrap(mod: nn.Module, mod_name: str, sharded: list[str], cast: list[str],
          gathers: _Gathers, dtype: torch.dtype | None) -> None:
    orig: Callable[..., object] = mod.forward
    if getattr(orig, "_shardlang_at_use", False):
        return  # a module reachable under two names is wrapped once

    def name(n: str) -> str:
        """The site its collectives are recorded at: the module (a root parameter: itself)."""
        return mod_name or n

    @functools.wraps(orig)
    def forward(*args: object, **kwargs: object) -> object:
        grad = torch.is_grad_enabled()
        params = {n: mod._parameters[n] for n in sharded}
        used = {n: gathers.take(p, name(n)) for n, p in params.items()}
        shadowed = {n: mod.__dict__[n] for n in cast if n in mod.__dict__}  # local views
        mod.__dict__.update({n: local_view(g) for n, g in used.items()} if gathers.local
                            else used)
        for n in cast:
            mod.__dict__[n] = cast_to(shadowed.get(n, mod._parameters[n]), dtype)
        try:
            out = orig(*args, **kwargs)
        finally:
            for n in (*sharded, *cast):
                mod.__dict__.pop(n, None)
            mod.__dict__.update(shadowed)
            for p in params.values():
                gathers.release(p, keep_for_backward=grad)
        if grad and params:
            _before_backward(out, lambda: [gathers.regather(p, used[n], name(n))
                                           for n, p in params.items()])
        return out

    forward._shardlang_at_use = True  # type: ignore[attr-defined]
    mod.forward = forward  # type: ignore[method-assign]


def _before_backward(out: object, run: Callable[[], object]) -> None:
    """Call ``run`` once, when the first gradient reaches one of ``out``'s tensors (before
    any op of the module that made them runs backward)."""
    done = [False]

    def hook(g: torch.Tensor) -> None:
        if not done[0]:
            done[0] = True
            run()

    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(hook)
