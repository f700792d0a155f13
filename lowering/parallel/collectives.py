"""The explicit collectives of ``sl.shard_map``, on each rank's local block.

psum, all_gather and psum_scatter are DTensor redistributions on the one-dimensional
sub-mesh of their mesh axis, so forward and backward are DTensor's (and rank-dependent
slicing works in simulate mode); all_to_all (:mod:`.expert`) is one ``all_to_all_single``
and ppermute (:mod:`.sequence`) an all-to-all with one non-empty block, each in an
autograd Function:

| call          | forward               | backward                         |
|---------------|-----------------------|----------------------------------|
| psum          | Partial -> Replicate  | identity (result is replicated)  |
| all_gather    | Shard(d) -> Replicate | keep own block (no communication)|
| psum_scatter  | Partial -> Shard(d)   | all-gather                       |
| all_to_all    | all_to_all_single     | all-to-all back                  |
| ppermute      | send to i+shift       | permute by -shift                |
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

import shardlang as sl
from lowering.parallel.expert import all_to_all
from lowering.parallel.sequence import ppermute
from lowering.plan import contiguous_stride
from lowering.schedule import Op, Recorder, logical

__all__ = ["run_collective"]


def _redistribute(x: torch.Tensor, sub: DeviceMesh, src: Placement, dst: Placement) -> torch.Tensor:
    n = sub.size()
    shape = list(x.shape)
    if isinstance(src, Shard):
        shape[src.dim] *= n
    d = DTensor.from_local(x, sub, [src], run_check=False, shape=torch.Size(shape),
                           stride=contiguous_stride(shape))
    return d.redistribute(sub, [dst]).to_local()


def run_collective(comm: sl.Comm, x: torch.Tensor, sub: DeviceMesh, *, dim: int = 0,
                   split_dim: int = 0, concat_dim: int = 0, shift: int = 1,
                   recorder: Recorder | None = None) -> torch.Tensor:
    """Issue one explicit collective on ``x`` (a rank's local block) over ``sub``."""
    nd = x.dim()

    def norm(d: int, name: str) -> int:
        if not -nd <= d < nd:
            raise sl.ShardingError(
                f"sl.{comm.value}: {name}={d} is out of range for a tensor of shape "
                f"{tuple(x.shape)}"
            )
        return d % nd

    n = sub.size()
    if comm is sl.Comm.PSUM:
        return _redistribute(x, sub, Partial(), Replicate())
    if comm is sl.Comm.ALL_GATHER:
        d = norm(dim, "dim")
        with logical(Op.ALL_GATHER, [s * n if i == d else s for i, s in enumerate(x.shape)]):
            return _redistribute(x, sub, Shard(d), Replicate())
    if comm is sl.Comm.PSUM_SCATTER:
        d = norm(dim, "dim")
        if x.shape[d] % n:
            raise sl.ShardingError(
                f"sl.psum_scatter over {sub.mesh_dim_names[0]!r} (size {n}) needs dim {d} "
                f"(size {x.shape[d]}) divisible by {n}"
            )
        with logical(Op.REDUCE_SCATTER, x.shape):
            return _redistribute(x, sub, Partial(), Shard(d))
    if comm is sl.Comm.ALL_TO_ALL:
        s, c = norm(split_dim, "split_dim"), norm(concat_dim, "concat_dim")
        if x.shape[s] % n:
            raise sl.ShardingError(
                f"sl.all_to_all over {sub.mesh_dim_names[0]!r} (size {n}) needs split_dim {s} "
                f"(size {x.shape[s]}) divisible by {n}"
            )
        return all_to_all(x, sub, s, c, recorder)
    if comm is sl.Comm.PPERMUTE:
        return ppermute(x, sub, shift % n, recorder)
    raise sl.ShardingError(f"unknown collective {comm!r}")
