"""Spec -> DTensor placements, over the mesh axes that actually split something.

The DTensor mesh carries only the axes of size > 1 (and never ``pp``, which splits the
layer stack into stages rather than tensors): DTensor's sharding propagation costs
grow quickly with mesh dims, and an axis of size 1 changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.distributed.tensor import Placement, Replicate, Shard

import shardlang as sl

__all__ = ["tensor_axes", "placements", "fsdp_dim", "describe", "contiguous_stride"]


def tensor_axes(mesh: sl.Mesh) -> tuple[str, ...]:
    """The mesh axes DTensor sees, in canonical order."""
    return tuple(a for a in mesh.shape if a != "pp")


def placements(spec: sl.P, mesh: sl.Mesh, *, fsdp: int | None = None) -> tuple[Placement, ...]:
    """One placement per DTensor mesh axis: ``Shard(d)`` where the spec puts the axis on
    dim d, else ``Replicate()``. ``fsdp`` shards that dim over ``dp`` as well (a dim
    the spec leaves to dp is never chosen: see :func:`fsdp_dim`)."""
    out: list[Placement] = []
    for axis in tensor_axes(mesh):
        dim = spec.dim_of(axis)
        if dim is None and axis == "dp" and fsdp is not None:
            dim = fsdp
        out.append(Shard(dim) if dim is not None else Replicate())
    return tuple(out)


def fsdp_dim(spec: sl.P, shape: Sequence[int], mesh: sl.Mesh) -> int | None:
    """The dim FSDP shards over dp: the first dim no other mesh axis (of size > 1)
    shards, dim 0 for most weights; None for a scalar or a tensor the spec already
    shards over dp."""
    if "dp" in spec.mesh_axes or not shape:
        return None
    for d in range(len(shape)):
        if not any(mesh.axis_size(a) > 1 for a in spec.axes_of(d)):
            return d
    return 0


def describe(pl: Sequence[Placement], mesh: sl.Mesh) -> str:
    """``dp:Shard(0) tp:Replicate()``, for printing."""
    return " ".join(f"{a}:{p}" for a, p in zip(tensor_axes(mesh), pl)) or "(single device)"


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this shape (for ``DTensor.from_local``)."""
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))
