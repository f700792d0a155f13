"""Memory per rank, counted on the tensors of one training step (dry and simulate modes).

:class:`MemoryMeter` watches step 0. It counts the bytes of the tensors a rank holds:
parameters, gradients (after backward) and optimizer state (after the optimizer's step),
each rank's own block (simulate mode: every rank's, from its LocalTensor); and it keeps
every tensor autograd saves for backward in a small holder that leaves when autograd
drops it, so the bytes saved and still alive can be summed at any moment (one count per
storage: views of one tensor count once; parameters are not activations, nor are FSDP's
gathered parameters, which count as buffers).

* **simulate** (measured): activations are the live saved bytes at their peak, sampled
  at the end of the forward, and under a pipeline after every forward action.
* **dry** (predicted): the same counts on meta tensors, at any world size. A pipeline's
  dry trace runs one microbatch per chunk (the others replay its records), so what one
  forward of each chunk saves is walked through the schedule's action order
  (:func:`lowering.plan.memory.in_flight_peak`); parameters, gradients and optimizer
  state come from the plan (:func:`lowering.plan.memory.state_bytes`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from lowering._torch import sdpa, storage_blocks
from lowering.parallel.fsdp import gathered_peak, gathered_storages
from lowering.plan import (Action, Kind, Memory, Plan, StackCost, in_flight_peak,
                           recomputed_bytes, recomputes, state_bytes)
from lowering.schedule import Op, Record

__all__ = ["MemoryMeter"]

Block = tuple[int, int, torch.UntypedStorage]  # (local rank, storage identity, storage)


class _Held:
    """One saved tensor, while autograd keeps it."""

    __slots__ = ("t", "forget")

    def __init__(self, t: torch.Tensor, forget: Callable[[int], object]) -> None:
        self.t, self.forget = t, forget

    def __del__(self) -> None:
        self.forget(id(self))


def _unpack(x: object) -> torch.Tensor:
    return x.t if isinstance(x, _Held) else x  # type: ignore[return-value]


class _FusedAttention(TorchFunctionMode):
    """Dry mode: a model's own ``F.scaled_dot_product_attention`` on meta tensors saves
    what the fused kernel of a real run saves (:func:`lowering._torch.sdpa`). On DTensors
    the call goes on to the plan's own attention (ring, local blocks or global view),
    which runs that kernel on each rank's blocks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is F.scaled_dot_product_attention and not (args and isinstance(args[0], DTensor)):
            return sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class MemoryMeter:
    """Step 0's bytes per rank. ``models`` maps a pipeline coordinate to its stage model
    (one entry without a pipeline); ``ranks`` is how many ranks one stage's tensors hold
    (simulate: the stage's world, each a LocalTensor entry; dry and run: 1)."""

    def __init__(self, models: Mapping[int, nn.Module], *, ranks: int, dry: bool) -> None:
        self.models, self.ranks, self.dry = dict(models), ranks, dry
        self._live: dict[int, tuple[int, list[Block]]] = {}
        self._changes = 0  # how often _live changed: live() is asked around every action
        self._counted: dict[int, tuple[int, dict[int, int]]] = {}  # pp -> (changes, live)
        self._params = {key for m in models.values() for p in m.parameters()
                        for _, key, _ in self._blocks(p)}
        self._inputs: set[int] = set()
        self._pp = 0
        self.activations: dict[int, dict[int, int]] = defaultdict(dict)  # pp -> rank -> peak
        self.forward_bytes: dict[int, dict[int, int]] = defaultdict(dict)  # pp -> chunk -> B
        self.released: dict[int, dict[int, int]] = defaultdict(dict)       # by its backward
        self.grads: dict[int, dict[int, int]] = {}
        self.optimizer: dict[int, dict[int, int]] = {}

    # -- counting ----------------------------------------------------------------------
    def _blocks(self, t: torch.Tensor) -> list[Block]:
        blocks = storage_blocks(t)
        if len(blocks) == 1 and self.ranks > 1:  # one plain tensor every simulated rank uses
            _, key, st = blocks[0]
            return [(r, key, st) for r in range(self.ranks)]
        return blocks

    def _bytes(self, tensors: Iterator[torch.Tensor]) -> dict[int, int]:
        out, seen = dict.fromkeys(range(self.ranks), 0), set()
        for t in tensors:
            for r, key, st in self._blocks(t):
                if (r, key) not in seen:
                    seen.add((r, key))
                    out[r] += st.nbytes()
        return out

    def live(self, pp: int) -> dict[int, int]:
        """Bytes autograd holds now for pipeline rank ``pp``, per local rank."""
        known = self._counted.get(pp)
        if known is not None and known[0] == self._changes:
            return dict(known[1])  # nothing saved or released since (a replayed action)
        out, seen = dict.fromkeys(range(self.ranks), 0), set()
        for tag, blocks in self._live.values():
            if tag != pp:
                continue
            for r, key, st in blocks:
                if (r, key) not in seen:
                    seen.add((r, key))
                    out[r] += st.nbytes()
        self._counted[pp] = (self._changes, dict(out))
        return out

    def held_bytes(self, t: torch.Tensor) -> int:
        """Rank 0's bytes of ``t`` (its own block)."""
        return self._bytes(iter([t]))[0]

    def inputs(self, *tensors: torch.Tensor) -> None:
        """The step's batch: the loop holds it whatever autograd saves (like parameters,
        not an activation; a pipeline's microbatches are views of it)."""
        self._inputs |= {key for t in tensors for _, key, _ in self._blocks(t)}

    def _pack(self, t: torch.Tensor) -> object:
        skip = self._params | self._inputs | gathered_storages(self.models[self._pp])
        blocks = [b for b in self._blocks(t) if b[1] not in skip]
        if not blocks:
            return t
        held = _Held(t, self._forget)
        self._live[id(held)] = (self._pp, blocks)
        self._changes += 1
        return held

    def _forget(self, key: int) -> None:
        if self._live.pop(key, None) is not None:
            self._changes += 1

    # -- the step's moments --------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self, pp: int = 0) -> Iterator[None]:
        """Keep count of what autograd saves while pipeline rank ``pp`` runs."""
        before, self._pp = self._pp, pp
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), \
                    (_FusedAttention() if self.dry else contextlib.nullcontext()):
                yield
        finally:
            self._pp = before

    def sample(self, pp: int = 0) -> None:
        """The end of a forward: the activation peak so far."""
        peak = self.activations[pp]
        for r, n in self.live(pp).items():
            peak[r] = max(peak.get(r, 0), n)

    @contextlib.contextmanager
    def action(self, pp: int, a: Action) -> Iterator[None]:
        """A pipeline action: what microbatch 0's forward of a chunk saves (the one a dry
        trace runs) and what its backward releases; the peak after every forward."""
        before = self.live(pp)[0] if a.kind in (Kind.F, Kind.B) else 0
        yield
        if a.kind in (Kind.F, Kind.B) and a.microbatch == 0:
            delta = self.live(pp)[0] - before
            (self.forward_bytes if a.kind is Kind.F else self.released)[pp][a.chunk] = -delta \
                if a.kind is Kind.B else delta
        if a.kind is Kind.F:
            self.sample(pp)

    def after_backward(self, pp: int = 0) -> None:
        self.grads[pp] = self._bytes(p.grad for p in self.models[pp].parameters()
                                     if p.grad is not None)

    def after_optimizer(self, opt: torch.optim.Optimizer, pp: int = 0) -> None:
        self.optimizer[pp] = self._bytes(t for s in opt.state.values() for t in s.values()
                                         if isinstance(t, torch.Tensor))

    # -- the report ----------------------------------------------------------------------
    def report(self, plan: Plan, records: Mapping[int, list[Record]], *, first_rank: int,
               stage_world: int, stack: Mapping[int, Mapping[int, StackCost]] | None = None
               ) -> dict[int, Memory]:
        """Global rank -> its bytes. ``first_rank``: the local rank of entry 0 (dry mode
        traces one rank); ``records``: each pipeline rank's recorded step; ``stack``: the
        layer stack's forward per pipeline rank and chunk (dry mode: activations under
        the plan's recompute, :mod:`lowering.plan.recompute`)."""
        out = {}
        for pp, model in self.models.items():
            buffers = gathered_peak(model) + _all_to_all_buffers(records.get(pp, []))
            params = self._bytes(iter(model.parameters()))
            for r in range(self.ranks):
                if self.dry:
                    state = state_bytes(plan, model)
                    act = self._predicted_activations(plan, pp, (stack or {}).get(pp, {}))
                    mem = Memory(state.params, state.grads, state.optimizer, act, buffers)
                else:
                    mem = Memory(params[r], self.grads.get(pp, {}).get(r, 0),
                                 self.optimizer.get(pp, {}).get(r, 0),
                                 self.activations[pp].get(r, 0), buffers)
                out[pp * stage_world + first_rank + r] = mem
        return out

    def _predicted_activations(self, plan: Plan, pp: int, stack: Mapping[int, StackCost]) -> int:
        """Dry mode: the activation peak, under the plan's recompute (full: each layer's
        input held instead of its saves, and one layer's saves while its backward runs)."""
        mode = plan.options.recompute
        extra = max((s.largest for s in stack.values()), default=0) if recomputes(mode) else 0
        if plan.pipe:
            return extra + in_flight_peak(plan.pipe, pp,
                                          recomputed_bytes(self.forward_bytes[pp], stack, mode),
                                          recomputed_bytes(self.released[pp], stack, mode))
        return extra + recomputed_bytes({0: self.activations[pp].get(0, 0)}, stack, mode)[0]


def _all_to_all_buffers(records: list[Record]) -> int:
    """An all-to-all's send and receive buffers, for the largest one of the step."""
    return 2 * max((x.bytes for x in records if x.op is Op.ALL_TO_ALL), default=0)
