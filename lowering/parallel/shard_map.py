"""``sl.shard_map`` under a plan: local view with explicit, checked collectives.

Inside a region every local tensor carries the set of mesh axes it *varies* over (as
in JAX's shard_map): inputs vary over the axes their spec shards; an op's result
varies over the union of its inputs'; ``psum`` and ``all_gather`` make a result
invariant over their axis. When an invariant value meets a varying one, an implicit
``pvary`` marks it varying: identity forward, ``psum`` of the cotangent backward. This
is what makes gradients right without the user thinking about it (it is Megatron's
"f" operator when a replicated activation meets a column-parallel weight). An output
that varies over an axis its ``out_axes`` do not shard is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

import shardlang as sl
from lowering._torch import tree_flatten, tree_leaves, tree_unflatten

__all__ = ["VaryingTracker", "check_outputs", "submesh"]

Vma = frozenset[str]


class _PVary(torch.autograd.Function):
    """Identity forward; psum of the cotangent over ``axes`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, psum: Callable[[torch.Tensor], torch.Tensor]):  # noqa: ANN001, ANN205
        ctx.psum = psum
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return ctx.psum(grad), None


class VaryingTracker(TorchFunctionMode):
    """Propagates "varies over" sets through torch ops inside a shard_map region."""

    def __init__(self, psum: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        super().__init__()
        self._vma: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._psum = psum
        self.paused = False  # True while a collective runs: its inner DTensor ops are ours

    def vma(self, t: torch.Tensor) -> Vma:
        return self._vma.get(t, frozenset())

    def mark(self, t: torch.Tensor, vma: Vma) -> torch.Tensor:
        self._vma[t] = frozenset(vma)
        return t

    def pvary(self, t: torch.Tensor, axes: Vma) -> torch.Tensor:
        """Make ``t`` vary over ``axes`` too (the cotangent is summed over them)."""
        missing = sorted(axes - self.vma(t))
        if not missing:
            return t
        if t.requires_grad:
            def psum(g: torch.Tensor) -> torch.Tensor:
                for a in missing:
                    g = self._psum(g, a)
                return g
            t2 = _PVary.apply(t, psum)
        else:
            t2 = t
        return self.mark(t2, self.vma(t) | axes) if t2 is not t else t2

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        union: frozenset[str] = frozenset().union(*(self.vma(t) for t in tensors))
        if union and any(self.vma(t) != union and t.requires_grad for t in tensors):
            flat = [self.pvary(a, union) if isinstance(a, torch.Tensor) else a for a in flat]
            args, kwargs = tree_unflatten(flat, spec)
        out = func(*args, **kwargs)
        if union:
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.mark(o, union)
        return out


def check_outputs(outs: Sequence[torch.Tensor], specs: Sequence[sl.P], tracker: VaryingTracker,
                  mesh_sizes: dict[str, int], fn_name: str) -> None:
    """An output may vary only over the mesh axes its spec shards."""
    for i, (o, spec) in enumerate(zip(outs, specs)):
        extra = sorted(a for a in tracker.vma(o) - set(spec.mesh_axes) if mesh_sizes.get(a, 1) > 1)
        if extra:
            raise sl.ShardingError(
                f"shard_map({fn_name}) output {i} varies over mesh axis {extra[0]!r} but its "
                f"out_axes give {spec!r}, which does not shard over {extra[0]!r}: "
                f"sl.psum(x, {extra[0]!r}) it, or name a logical axis that maps to "
                f"{extra[0]!r} in out_axes"
            )


def submesh(dmesh: DeviceMesh | None, axis: str) -> DeviceMesh | None:
    """The one-dimensional mesh of ``axis`` (None where the axis has size 1), made once per
    mesh and kept alive with it: simulate mode's LocalTensorMode caches each mesh's rank
    coordinates by ``id()``, so a freed sub-mesh whose address a new one reuses would hand
    that one the old axis' coordinates (a ring permute then sent its blocks to the ranks of
    another axis, depending on where the allocator put the mesh)."""
    if dmesh is None or axis not in (dmesh.mesh_dim_names or ()):
        return None
    made = dmesh.__dict__.setdefault("_shardlang_submeshes", {})
    if axis not in made:
        made[axis] = dmesh[axis]
    return made[axis]
