"""The explicit collectives of ``sl.shard_map``, on each rank's local block.

psum, all_gather and psum_scatter are DTensor redistributions on the one-dimensional
sub-mesh of their mesh axis, so forward and backward are DTensor's (and rank-dependent
slicing works in simulate mode); all_to_all is one ``all_to_all_single`` and ppermute an
all-to-all with one non-empty block, each in an autograd Function:

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
from lowering._torch import funcol, per_rank
from lowering.placements import contiguous_stride
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


def _all_to_all(x: torch.Tensor, sub: DeviceMesh, s: int, c: int,
                recorder: Recorder | None) -> torch.Tensor:
    """One all_to_all_single: block j of ``x`` along ``s`` goes to rank j; the blocks that
    arrive are concatenated along ``c`` in source-rank order. (A DTensor Shard -> Shard
    redistribution would do the same, but on CPU process groups torch falls back to an
    all-gather and a slice, which moves n times the bytes.)"""
    n = sub.size()
    xs = x.movedim(s, 0).contiguous()                  # (S, *rest): rows for rank j in block j
    if recorder is None:
        out = funcol.all_to_all_single(xs, None, None, sub.get_group())
    else:
        with recorder.explicit(Op.ALL_TO_ALL, shape=tuple(x.shape)):
            out = funcol.all_to_all_single(xs, None, None, sub.get_group())
    out = funcol.wait_tensor(out)
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


class _PPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sub: DeviceMesh, shift: int,  # noqa: ANN001
                recorder: Recorder | None) -> torch.Tensor:
        ctx.sub, ctx.shift, ctx.recorder = sub, shift, recorder
        return _permute(x, sub, shift, recorder)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return _permute(grad.contiguous(), ctx.sub, -ctx.shift, ctx.recorder), None, None, None


def _permute(x: torch.Tensor, sub: DeviceMesh, shift: int, recorder: Recorder | None) -> torch.Tensor:
    n, rows = sub.size(), x.shape[0]

    me = sub.get_local_rank()  # one value per simulated rank in simulate mode

    def split(peer_offset: int, j: int) -> int:
        return per_rank(lambda r: rows if j == (int(r) + peer_offset) % n else 0)(me)

    send = [split(shift, j) for j in range(n)]   # my rows go to rank me + shift
    recv = [split(-shift, j) for j in range(n)]  # rank me - shift's rows come to me
    group = sub.get_group()
    if recorder is None:
        out = funcol.all_to_all_single(x.contiguous(), recv, send, group)
    else:
        with recorder.explicit(Op.PERMUTE, shift=shift):
            out = funcol.all_to_all_single(x.contiguous(), recv, send, group)
    return funcol.wait_tensor(out)


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
        return _AllToAll.apply(x, sub, s, c, recorder)
    if comm is sl.Comm.PPERMUTE:
        return _PPermute.apply(x, sub, shift % n, recorder)
    raise AssertionError(f"unhandled collective {comm}")
