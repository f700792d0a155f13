"""One collective for many parameters: an FSDP unit's all-gather and reduce-scatter.

Each member is sharded over dp on its own dim ``d`` (evenly, :mod:`lowering.plan.units`).
Every rank lays its members' blocks end to end in one flat buffer, so after one
all-gather over dp the buffer holds rank ``r``'s blocks in row ``r``; each member's whole
tensor is its columns of every row, put back along ``d`` (a copy, as FSDP2's copy-out).
The gradients go the other way: each member's dp-partial gradient split along ``d`` into
dp blocks, block ``r`` of every member into row ``r``, one reduce-scatter, and this
rank's row cut back into its members' blocks. The recorded payload is the members' bytes
summed; the wire bytes are those of the members gathered one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from lowering._torch import all_gather_rows, dtensor_of, local_block, reduce_scatter_rows
from lowering.plan import contiguous_stride
from lowering.schedule import Op, logical, site

__all__ = ["gather_flat", "reduce_scatter_flat", "dp_dim", "cast_to"]


def dp_dim(mesh: DeviceMesh) -> int:
    return list(mesh.mesh_dim_names or ()).index("dp")


def cast_to(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` if it is floating point (None: as it is)."""
    return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)


def gather_flat(params: Sequence[DTensor], dims: Sequence[int], name: str,
                dtype: torch.dtype | None) -> list[DTensor]:
    """Each of ``params`` (sharded over dp on its dim in ``dims``) gathered over dp, in one
    all-gather (cast to ``dtype`` first, so the gather moves it)."""
    mesh = params[0].device_mesh
    at = dp_dim(mesh)
    n = mesh.size(at)
    with torch.no_grad():
        blocks = [cast_to(local_block(p), dtype) for p in params]
        flat = torch.cat([b.reshape(-1) for b in blocks])
        with site(name), logical(Op.ALL_GATHER, (n * flat.numel(),)):
            rows = all_gather_rows(flat, (mesh, at)).view(n, -1)
        out, off = [], 0
        for p, b, d in zip(params, blocks, dims):
            k = b.numel()
            part = rows[:, off:off + k].reshape(n, *b.shape).movedim(0, d)
            shape = (*b.shape[:d], n * b.shape[d], *b.shape[d + 1:])
            off += k
            pl = [Replicate() if i == at else q for i, q in enumerate(p.placements)]
            out.append(dtensor_of(part.reshape(shape).contiguous(), mesh, pl, p.shape,
                                  contiguous_stride(p.shape)))
    return out


def reduce_scatter_flat(grads: Sequence[DTensor], dims: Sequence[int], name: str
                        ) -> list[DTensor]:
    """Each of ``grads`` (partial sums over dp of a gathered parameter) reduce-scattered
    over dp to its block on its dim in ``dims``, in one reduce-scatter; the placements on
    the other mesh dims are kept for the caller to finish (:func:`.data.reduce_grad`)."""
    mesh = grads[0].device_mesh
    at = dp_dim(mesh)
    n = mesh.size(at)
    blocks = []
    for g, d in zip(grads, dims):
        b = local_block(g)
        split = b.reshape(*b.shape[:d], n, b.shape[d] // n, *b.shape[d + 1:]).movedim(d, 0)
        blocks.append(split.reshape(n, -1))
    flat = torch.cat(blocks, dim=1).reshape(-1)
    with site(name), logical(Op.REDUCE_SCATTER, tuple(flat.shape)):
        mine = reduce_scatter_rows(flat, (mesh, at))
    out, off = [], 0
    for g, d, blk in zip(grads, dims, blocks):
        k = blk.shape[1]
        b = local_block(g)
        shape = (*b.shape[:d], b.shape[d] // n, *b.shape[d + 1:])
        off += k
        pl = [Shard(d) if i == at else q for i, q in enumerate(g.placements)]
        out.append(dtensor_of(mine[off - k:off].view(shape), mesh, pl, g.shape,
                              contiguous_stride(g.shape)))
    return out
