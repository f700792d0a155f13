"""Run one function (not a whole model) on a mesh: the tutorials' sharded matmuls.

``trace_function`` runs ``fn`` in simulate mode (every rank in this process) or dry
mode (meta tensors) under a lowering context, records its collectives, and returns the
global result with every rank's local block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import implicit_replication, rank_values
from lowering.parallel import DTensorContext
from lowering.parallel.tensor import LocalOps
from lowering.plan import Options, Plan
from lowering.run.session import Mode, group_axes, session
from lowering.schedule import Record, Recorder

__all__ = ["FunctionTrace", "trace_function"]


@dataclass
class FunctionTrace:
    mesh: sl.Mesh
    output: torch.Tensor | None      # the global result (None in dry mode)
    local: list[torch.Tensor]        # each rank's local block of the result (simulate)
    placements: str                  # how the result is laid out over the mesh
    records: list[Record]            # the collectives, in issue order


def trace_function(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], *,
                   mesh: sl.Mesh, rules: sl.Rules, dry: bool = False,
                   backward: bool = False) -> FunctionTrace:
    """Call ``fn(*args)`` (global view, using ``sl`` calls) on ``mesh`` and record it.

    With ``backward=True`` the sum of the output is differentiated too, so backward
    collectives appear in the records.

    Example:
        >>> import torch, shardlang as sl
        >>> from lowering.run.functions import trace_function
        >>> f = sl.shard_map(lambda x: sl.psum(x, "tp"), in_axes=(("batch", "mlp"),),
        ...                  out_axes=("batch", None))
        >>> t = trace_function(f, [torch.ones(2, 4)], mesh=sl.Mesh(tp=2), rules=sl.Rules(mlp="tp"))
        >>> t.output.shape, [r.op.value for r in t.records]
        (torch.Size([2, 2]), ['all_reduce'])
    """
    plan = Plan(mesh=mesh, rules=rules, options=Options(), params=(), aliases=())
    with session(mesh, Mode.DRY if dry else Mode.SIMULATE) as sess:
        if sess.dmesh is None:
            out = fn(*args)
            return FunctionTrace(mesh, out, [out], "(single device)", [])
        recorder = Recorder(group_axes(sess))
        ctx = DTensorContext(plan, sess.dmesh, recorder)
        inputs = [a.to("meta") if dry else a for a in args]
        if backward:
            inputs = [a.detach().requires_grad_(a.is_floating_point()) for a in inputs]
        with recorder.recording(), sl.activate(ctx), implicit_replication(), LocalOps():
            out = fn(*inputs)
            if backward:
                out.sum().backward()
        if not isinstance(out, DTensor):
            return FunctionTrace(mesh, None if dry else out.detach(), [], "(plain tensor)",
                                 recorder.records)
        shown = str(out.placements)
        if dry:
            return FunctionTrace(mesh, None, [], shown, recorder.records)
        full = rank_values(out.full_tensor().detach(), mesh.size)[0].clone()
        local = [t.clone() for t in rank_values(out.to_local().detach(), mesh.size)]
        return FunctionTrace(mesh, full, local, shown, recorder.records)
