"""Memory traffic as a fusing GPU stack has it: the bytes of memory-bound ops that reach HBM.

A GPU training stack does not run a norm, a rotary embedding or SiLU x gate as chains of
eager ops, each reading and writing the whole activation: Megatron-LM and Transformer
Engine ship fused kernels for them, and ``torch.compile`` (Inductor) fuses every chain of
pointwise ops and reductions into one kernel. Such a kernel reads its inputs from memory
once and writes what the rest of the step still needs; the intermediates stay on chip.
An eager RMSNorm in fp32 moves about ten activations' worth of bytes, a fused one two.

:class:`Fusion` counts those bytes on the dry trace, op by op, with no graph capture:

* a **memory-bound op** (no FLOP formula; views and allocations move nothing) reads each
  input that is *materialized* (a parameter, the batch, a matmul's, attention's or a
  collective's output, anything alive at an action or layer boundary) and nothing for an
  input another memory-bound op produced that nothing materialized since: that read is
  fused. Its output is *pending*: it costs nothing yet.
* a **pending tensor is written** (its bytes counted, in the phase that produced it) when
  an op that does not fuse reads it (a matmul, fused attention, a collective), or when it
  is still alive at a boundary (:meth:`Fusion.flush`: a step's output, or a tensor autograd
  saved for the backward). A pending tensor that dies first never reaches memory.
* a view of a pending tensor is pending with it (one buffer); an op that writes in place
  (the optimizer's updates) moves every byte it touches, as eager does.

It is an ideal fusion, a lower bound on what a real stack moves: every chain between two
matmuls is one kernel. ``explain`` uses it for GPU profiles (their ``fuses`` flag) and the
eager count for the ``cpu`` profile, where shardlang itself runs every op eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowering._torch import tree_leaves
from lowering.schedule.records import Phase

__all__ = ["Fusion"]


class _Buffer:
    __slots__ = ("nbytes", "phase", "written")

    def __init__(self, nbytes: int, phase: Phase) -> None:
        self.nbytes, self.phase, self.written = nbytes, phase, False


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view(func: Any) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


class Fusion:
    """Fused HBM bytes per phase (module doc). Feed it every plain-tensor op in order."""

    def __init__(self) -> None:
        self.pending: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> _Buffer
        self.bytes: dict[Phase, float] = {}

    def _count(self, phase: Phase, n: float) -> None:
        if n:
            self.bytes[phase] = self.bytes.get(phase, 0.0) + n

    def _fused(self, t: torch.Tensor) -> _Buffer | None:
        """The pending buffer ``t`` lives in, if nothing wrote it yet."""
        b = self.pending.get(t)
        return b if b is not None and not b.written else None

    def _write(self, t: torch.Tensor) -> None:
        b = self.pending.pop(t, None)
        if b is not None and not b.written:
            b.written = True
            self._count(b.phase, b.nbytes)

    def consume(self, tree: object) -> None:
        """Something that does not fuse (a matmul, a collective) reads these tensors."""
        for t in _tensors(tree):
            self._write(t)

    def op(self, func: Any, args: tuple, kwargs: dict, out: object, *, fuses: bool,
           eager_bytes: int, phase: Phase) -> None:
        """One op: ``fuses`` is False for matmuls and fused attention (their inputs are
        written; their outputs are materialized); ``eager_bytes``: what it moves eagerly."""
        ins = _tensors((args, kwargs))
        if not fuses:
            self.consume(ins)
            return
        if func._schema.is_mutable:  # in place: moves every byte it touches
            self.consume(ins)
            self._count(phase, eager_bytes)
            return
        outs = _tensors(out)
        if _is_view(func):
            src = next((b for b in map(self._fused, ins) if b is not None), None)
            if src is not None:
                for o in outs:
                    self.pending[o] = src
            return
        if not eager_bytes:
            return  # an allocation: nothing moves
        self._count(phase, sum(_nbytes(t) for t in ins if self._fused(t) is None))
        for o in outs:
            self.pending[o] = _Buffer(_nbytes(o), phase)

    def flush(self) -> None:
        """A boundary: every pending tensor still alive is in memory now."""
        for t in list(self.pending.keys()):
            self._write(t)
