"""Data parallelism on local tensors: a dp-only model's forward without DTensor dispatch.

On a mesh that splits nothing but the batch (``dp`` > 1, every other axis 1), every
parameter is replicated (or, under FSDP, gathered whole at use) and every activation is
a block of rows. Running each op
as a DTensor then only adds dispatch (sharding propagation, wrapping) to what the local
op does. So the first forward of each kind of call (argument structure and placements,
grad mode, ``model.training``) runs as DTensors under a probe, which decides whether the
forward is *batch-local*:

* no collective in the forward but FSDP's gathers (an op that needs other rows, e.g. BatchNorm's
  statistics or ``x - x.mean(0)``, makes DTensor gather or reduce over dp);
* no random op (DTensor draws dropout masks as one device would; a local draw would not);
* no ``sl.aux_loss`` / ``sl.metric`` (a mean over the local rows is not the global one);
* every tensor the forward returns is sharded over dp (rows, not a reduction over them),
  and every input sharded over dp splits evenly.

If so, later calls of that kind run the model as one device on this rank's rows: inputs
become their local blocks, every parameter and buffer is read as its local tensor (the
gradient goes back to the parameter as a partial sum over dp, exactly what the DTensor
forward yields, so the gradient buckets and the schedule are unchanged), no lowering
context is active, and each output becomes a DTensor again with the placements the probe
saw. A loss computed on the outputs keeps global semantics (``loss.item()`` is the mean
over the global batch). Otherwise the model keeps running as DTensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

import shardlang as sl
from lowering._torch import (TorchDispatchMode, draws_random, is_functional_collective,
                             is_higher_order, op_name, tree_flatten, tree_unflatten)
from lowering.parallel.fsdp import local_view
from lowering.plan import Plan
from lowering.schedule import COLLECTIVES

__all__ = ["install_local_dp", "eligible"]


def eligible(plan: Plan) -> bool:
    """The layout splits only the batch over dp (FSDP's parameter shards are gathered
    whole at use)."""
    mesh = plan.mesh
    return mesh.dp > 1 and mesh.size == mesh.dp


class _Probe(TorchDispatchMode):
    """Counts the collectives and random draws of the forward it surrounds."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives = self.random = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if is_higher_order(func):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar first: its collectives come back here
        if is_functional_collective(func):
            self.collectives += op_name(func) in COLLECTIVES
        elif draws_random(func, args, kwargs):
            self.random += 1
        return func(*args, **kwargs)


def _dp_dims(dmesh: DeviceMesh) -> list[int]:
    return [d for d in range(dmesh.ndim) if dmesh.size(d) > 1]


def _even(t: DTensor, dims: list[int]) -> bool:
    """Every dim ``t`` is sharded on over ``dims`` splits into equal blocks."""
    return all(not isinstance(t.placements[d], Shard)
               or t.shape[t.placements[d].dim] % t.device_mesh.size(d) == 0 for d in dims)


def _leaf_key(x: object, dims: list[int]) -> object:
    if isinstance(x, DTensor):
        return ("D", tuple(x.placements), x.dim(), _even(x, dims))
    return ("T", x.dim()) if isinstance(x, torch.Tensor) else type(x)


def _out_placements(out: object, dims: list[int]) -> list[tuple[Placement, ...] | None] | None:
    """Per output leaf its placements (None: not a tensor), or None if one is not rows."""
    got: list[tuple[Placement, ...] | None] = []
    for o in tree_flatten(out)[0]:
        if not isinstance(o, torch.Tensor):
            got.append(None)
            continue
        if not isinstance(o, DTensor) or not all(isinstance(o.placements[d], Shard) for d in dims):
            return None
        if not _even(o, dims):
            return None
        got.append(tuple(o.placements))
    return got


class _LocalDP:
    """The forward of one model: probed per kind of call, then local where it may be."""

    def __init__(self, model: nn.Module, dmesh: DeviceMesh) -> None:
        self.model, self.dmesh = model, dmesh
        self.dims = _dp_dims(dmesh)
        self.gathers = getattr(model, "_shardlang_gathers", None)
        self.verdicts: dict[object, list[tuple[Placement, ...] | None] | None] = {}

    def __call__(self, inner: Callable[..., object], args: tuple, kwargs: dict) -> object:
        flat, spec = tree_flatten((args, kwargs))
        leaves = tuple(_leaf_key(a, self.dims) for a in flat)
        key = (spec, leaves, torch.is_grad_enabled(), self.model.training)
        if key not in self.verdicts:
            even = all(k[3] for k in leaves if isinstance(k, tuple) and k[0] == "D")
            out, self.verdicts[key] = self._probe(inner, args, kwargs, even)
            return out
        verdict = self.verdicts[key]
        if verdict is None:
            return inner(*args, **kwargs)
        local = [a.to_local() if isinstance(a, DTensor) else a for a in flat]
        l_args, l_kwargs = tree_unflatten(local, spec)
        with _local_state(self.model, self.gathers), sl.activate(None):
            out = inner(*l_args, **l_kwargs)
        o_flat, o_spec = tree_flatten(out)
        if len(o_flat) != len(verdict):
            raise sl.ShardingError(
                f"{type(self.model).__name__}'s forward returned {len(o_flat)} values where "
                f"its first call with these arguments returned {len(verdict)}: a forward "
                "whose outputs change between calls alike cannot run on local tensors")
        wrapped = [o if pl is None else DTensor.from_local(o, self.dmesh, pl, run_check=False)
                   for o, pl in zip(o_flat, verdict)]
        return tree_unflatten(wrapped, o_spec)

    def _probe(self, inner: Callable[..., object], args: tuple, kwargs: dict,
               even: bool) -> tuple[object, list | None]:
        probe = _Probe()
        gathers = self.gathers
        before = gathers.issued if gathers is not None else 0
        with sl.collecting() as reported, probe:
            out = inner(*args, **kwargs)
        fsdp = (gathers.issued - before) if gathers is not None else 0  # one all-gather each
        for a in reported.aux:  # hand them on to whoever collects
            sl.aux_loss(a)
        for name, v in reported.metrics.items():
            sl.metric(name, v)
        ok = (probe.collectives == fsdp and not probe.random and not reported.aux
              and not reported.metrics and even)
        return out, (_out_placements(out, self.dims) if ok else None)


class _local_state:
    """While active, every module of ``model`` reads its replicated DTensor parameters and
    buffers as local tensors (shadowing them in the module's ``__dict__``), and FSDP's
    gathered parameters as local views of what it gathers."""

    def __init__(self, model: nn.Module, gathers: Any) -> None:
        self.model, self.gathers = model, gathers
        self.set: list[tuple[nn.Module, str]] = []

    def __enter__(self) -> None:
        for mod in self.model.modules():
            for table in (mod._parameters, mod._buffers):
                for n, t in table.items():
                    if (isinstance(t, DTensor) and n not in mod.__dict__
                            and all(pl.is_replicate() for pl in t.placements)):
                        mod.__dict__[n] = local_view(t)
                        self.set.append((mod, n))
        if self.gathers is not None:
            self.gathers.local = True

    def __exit__(self, *exc: object) -> None:
        if self.gathers is not None:
            self.gathers.local = False
        for mod, n in self.set:
            mod.__dict__.pop(n, None)
        self.set.clear()


def install_local_dp(model: nn.Module, plan: Plan, dmesh: DeviceMesh) -> None:
    """Run ``model``'s batch-local forwards on local tensors where the layout is dp-only."""
    if not eligible(plan) or not _dp_dims(dmesh):
        return
    state = _LocalDP(model, dmesh)
    inner: Callable[..., object] = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> object:
        return state(inner, args, kwargs)

    model.forward = forward  # type: ignore[method-assign]
    model._shardlang_local_dp = state  # type: ignore[assignment]
