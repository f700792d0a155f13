"""Data parallelism: gradients reduced over dp (DDP) during backward.

Parameters are replicated over ``dp``; the batch is sharded, so each gradient comes out
of backward ``Partial`` over dp. :func:`install_grad_sync` hooks every parameter: as soon
as autograd has accumulated its gradient, the gradient is all-reduced (one all-reduce per
parameter, issued while the rest of the backward still runs, in the order backward
finishes them; the payloads add up to all parameter bytes). Inside :func:`no_sync`
gradients accumulate unreduced and the first backward after it reduces the sum once.
:func:`sync_grads` does the same after backward, for the pipeline's stages. FSDP lives in
:mod:`.fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from lowering.plan import Plan
from lowering.schedule import Phase, Recorder

__all__ = ["sync_grads", "reduce_grad", "install_grad_sync", "GradSync"]


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


def install_grad_sync(model: nn.Module, dmesh: DeviceMesh,
                      recorder: Callable[[], Recorder | None]) -> GradSync:
    """Reduce each parameter's gradient to its placements as soon as backward has
    accumulated it (``recorder()`` is the recorder of the running step, if any)."""
    state = GradSync()
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

