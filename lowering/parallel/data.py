"""Data parallelism: gradients reduced over dp (DDP) during backward.

Parameters are replicated over ``dp``; the batch is sharded, so each gradient comes out
of backward ``Partial`` over dp. :func:`install_grad_sync` hooks every parameter: as soon
as autograd has accumulated its gradient, the gradient is all-reduced (one all-reduce per
bucket of :func:`lowering.plan.grad_buckets`, DDP-style: issued when the bucket's last
gradient is ready, while the rest of the backward still runs, waited on when backward
ends; the payloads add up to all parameter bytes). Inside :func:`no_sync`
gradients accumulate unreduced and the first backward after it reduces the sum once.
:func:`sync_grads` does the same after backward, for the pipeline's stages. FSDP lives in
:mod:`.fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from lowering._torch import (all_reduce_async, at_backward_end, dtensor_like, local_block,
                             storage_shared, wait)
from lowering.plan import GradBucket, Plan
from lowering.schedule import Phase, Recorder

__all__ = ["sync_grads", "reduce_grad", "sliced_first", "install_grad_sync", "GradSync"]


def reduce_grad(g: DTensor, dmesh: DeviceMesh, target: Sequence[Placement]) -> DTensor:
    """Bring a gradient to its parameter's placements, slicing before reducing: where
    the gradient is replicated but the parameter sharded (an embedding's backward
    yields a tp-replicated gradient), take this rank's block first (no communication),
    so the all-reduce or reduce-scatter over dp moves only that block."""
    target = tuple(target)
    g = sliced_first(g, dmesh, target)
    # then one mesh dim at a time, deterministic and one collective each: reduce-scatter
    # where the parameter is sharded (smaller blocks first), all-reduce where replicated
    for want_shard in (True, False):
        for d, (have, want) in enumerate(zip(g.placements, target)):
            if have.is_partial() and isinstance(want, Shard) == want_shard:
                step = list(g.placements)
                step[d] = want
                g = g.redistribute(dmesh, step)
    return g if tuple(g.placements) == target else g.redistribute(dmesh, target)


def _sliced(have: Sequence[Placement], target: Sequence[Placement]) -> list[Placement]:
    return [t if isinstance(t, Shard) and p.is_replicate() else p for p, t in zip(have, target)]


def sliced_first(g: DTensor, dmesh: DeviceMesh, target: Sequence[Placement]) -> DTensor:
    """``g`` with this rank's block taken on every mesh dim where it is replicated but
    the parameter sharded (no communication)."""
    sliced = _sliced(g.placements, target)
    return g if tuple(sliced) == tuple(g.placements) else g.redistribute(dmesh, sliced)


class GradSync:
    """The gradient hooks of one model; ``enabled`` False accumulates without reducing."""

    def __init__(self) -> None:
        self.enabled = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before


def _bucketable(g: DTensor, target: Sequence[Placement], dims: Sequence[int]) -> DTensor | None:
    """``g`` with this rank's block sliced where it is replicated but the parameter
    sharded (no communication), if what is left to do is a sum over exactly ``dims``."""
    sliced = _sliced(g.placements, target)
    partial = [d for d, p in enumerate(sliced) if p.is_partial()]
    if (partial != list(dims) or any(getattr(sliced[d], "reduce_op", "") != "sum" for d in dims)
            or any(not target[d].is_replicate() for d in dims)
            or any(sliced[d] != target[d] for d in range(len(target)) if d not in dims)):
        return None
    return g.redistribute(g.device_mesh, sliced) if tuple(sliced) != tuple(g.placements) else g


class _Buckets:
    """Runs :class:`~lowering.plan.GradBucket` s: when the last gradient of a bucket is
    ready, its flattened local blocks go out in one all-reduce per axis (not waited on:
    the rest of the backward runs meanwhile); when backward ends, every bucket is waited
    on and unpacked into the parameters' ``.grad``. A gradient whose placements are not
    what the plan predicted is reduced on its own (:func:`reduce_grad`)."""

    def __init__(self, buckets: Sequence[GradBucket], dmesh: DeviceMesh,
                 recorder: Callable[[], Recorder | None]) -> None:
        names = list(dmesh.mesh_dim_names or ())
        buckets = [b for b in buckets if all(a in names for a in b.axes)]
        self.buckets = [(b, sorted(names.index(a) for a in b.axes)) for b in buckets]
        self.of = {n: i for i, b in enumerate(buckets) for n in b.names}
        self.dmesh, self.recorder = dmesh, recorder
        self.buffers: dict[int, torch.Tensor] = {}
        self._reset()

    def _reset(self) -> None:
        self.ready: dict[int, list[tuple[nn.Parameter, DTensor]]] = {}
        self.left = {i: len(b.names) for i, (b, _) in enumerate(self.buckets)}
        self.issued: list[tuple[int, list[tuple[nn.Parameter, DTensor]], torch.Tensor]] = []
        self.armed = False

    def arrived(self, name: str, param: nn.Parameter, g: DTensor) -> bool:
        """Take ``param``'s gradient into its bucket; False if it has none."""
        i = self.of.get(name)
        if i is None:
            return False
        bucket, dims = self.buckets[i]
        ready = _bucketable(g, param.placements, dims)
        if ready is None:
            return False
        if not self.armed:
            self.armed = True
            at_backward_end(self.finish)
        self.ready.setdefault(i, []).append((param, ready))
        self.left[i] -= 1
        if self.left[i] == 0:
            self._issue(i)
        return True

    def _issue(self, i: int) -> None:
        bucket, dims = self.buckets[i]
        members = self.ready.pop(i)
        flat = self._flat(i, [local_block(g).reshape(-1) for _, g in members])
        rec = self.recorder()
        with (rec.site(bucket.site, Phase.BACKWARD) if rec else contextlib.nullcontext()):
            for k, d in enumerate(dims):  # in place: each axis after the last finished
                if k:
                    flat = wait(flat)
                flat = all_reduce_async(flat, "sum", (self.dmesh, d))
        self.issued.append((i, members, flat))

    def _flat(self, i: int, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The bucket's gradients in one flat buffer: the last step's, once nothing holds
        a view of it any more (no ``.grad`` handed out from it, nor an alias of one:
        DDP keeps its buckets too; a fresh buffer each step costs this machine's
        allocator page faults on every byte), else a new one. Plain tensors only (run
        mode; simulate and dry runs allocate as before)."""
        buf = self.buffers.get(i)
        if (buf is not None and type(buf) is torch.Tensor and not storage_shared(buf)
                and buf.numel() == sum(b.numel() for b in blocks)
                and all(type(b) is torch.Tensor and b.dtype == buf.dtype
                        and b.device == buf.device for b in blocks)):
            return torch.cat(blocks, out=buf)
        return torch.cat(blocks)

    def finish(self) -> None:
        """End of backward: issue what is still open (a gradient that never came), wait
        for every bucket, and unpack."""
        for i in sorted(self.ready):
            self._issue(i)
        for i, members, flat in self.issued:
            flat = wait(flat)
            at = 0
            for param, g in members:
                local = local_block(g)
                n = local.numel()
                block = flat[at:at + n].view(local.shape)
                at += n
                param.grad = dtensor_like(block, param)  # the parameter's own spec
            self.buffers[i] = flat
        self._reset()


def install_grad_sync(model: nn.Module, dmesh: DeviceMesh,
                      recorder: Callable[[], Recorder | None],
                      buckets: Sequence[GradBucket] = ()) -> GradSync:
    """Reduce each parameter's gradient to its placements as soon as backward has
    accumulated it, in ``buckets`` where the plan groups them (``recorder()`` is the
    recorder of the running step, if any)."""
    state = GradSync()
    bucketed = _Buckets(buckets, dmesh, recorder)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))

        def hook(param: nn.Parameter, name: str = name) -> None:
            g = param.grad
            if not state.enabled or not isinstance(g, DTensor) or \
                    tuple(g.placements) == tuple(param.placements):
                return
            if bucketed.arrived(name, param, g):
                return
            rec = recorder()
            with (rec.site(name, Phase.BACKWARD) if rec else contextlib.nullcontext()):
                param.grad = reduce_grad(g, dmesh, param.placements)

        p.register_post_accumulate_grad_hook(hook)
    return state


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

