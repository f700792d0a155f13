"""Activation recompute, predicted: what ``--recompute full`` changes in a traced step.

A dry trace runs without recompute and measures, per pipeline rank and chunk, what the
layer stack's forward costs for one microbatch (:class:`StackCost`: its compute, its
collectives, the bytes autograd saved inside it, the bytes of each layer's input and the
largest one layer saved). Under ``full`` recompute each layer keeps only its input; in
the backward it runs its forward again, then its backward:

| | without recompute | ``full`` |
|---|---|---|
| activations held | everything the layers save | each layer's input, plus one layer's saves while its backward runs |
| backward compute | the backward | the stack's forward again, then the backward |
| backward collectives | the backward's | the stack forward's tp, sp and ep collectives again (FSDP's backward gather serves both; dp and pp do not repeat) |

``selective`` (Megatron's: recompute the attention core's sequence-squared tensors) changes
nothing here: a fused attention kernel, which the traces use, saves none of them and
recomputes its scores in its own backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lowering.plan.options import Recompute
from lowering.schedule.records import Cost, Phase, Record

__all__ = ["StackCost", "recomputes", "recomputed_compute", "recomputed_records", "recomputed_bytes",
           "REPEATED_AXES"]

#: the axes whose forward collectives a recomputed layer issues again
REPEATED_AXES = ("tp", "sp", "ep")


@dataclass
class StackCost:
    """One microbatch's forward through a chunk's layers of the stack, on one rank."""

    forward: Cost = field(default_factory=Cost)       # compute inside the layers
    records: list[Record] = field(default_factory=list)  # collectives inside the layers
    saved: int = 0       # bytes autograd saved inside the layers
    inputs: int = 0      # bytes of the layers' inputs (what full recompute keeps)
    largest: int = 0     # the most one layer saved

    def add(self, forward: Cost, records: Sequence[Record], saved: int, inputs: int) -> None:
        self.forward = self.forward + forward
        self.records.extend(records)
        self.saved += saved
        self.inputs += inputs
        self.largest = max(self.largest, saved)


def recomputes(mode: Recompute | str) -> bool:
    """Whether ``mode`` changes the step (``full``; ``selective`` equals ``none`` here)."""
    return Recompute.parse(mode) is Recompute.FULL


def recomputed_compute(compute: Mapping[tuple[str, int], Cost],
                       stack: Mapping[int, StackCost], mode: Recompute | str
                       ) -> dict[tuple[str, int], Cost]:
    """A stage's compute with ``("R", chunk)``: the forward a backward of that chunk runs
    again (one microbatch's); unchanged without full recompute."""
    out = dict(compute)
    if recomputes(mode):
        for chunk, s in stack.items():
            out[("R", chunk)] = s.forward
    return out


def recomputed_records(records: Sequence[Record], stack: Mapping[int, StackCost],
                       mode: Recompute | str, microbatches: int = 1) -> list[Record]:
    """A stage's records with the recomputed forwards' tp/sp/ep collectives added to the
    backward (each microbatch's, ``microbatches`` per chunk)."""
    out = list(records)
    if recomputes(mode):
        for s in stack.values():
            again = [dataclasses.replace(x, phase=Phase.BACKWARD) for x in s.records
                     if x.axis in REPEATED_AXES]
            out += again * microbatches
    return out


def recomputed_bytes(per_chunk: Mapping[int, int], stack: Mapping[int, StackCost],
                     mode: Recompute | str) -> dict[int, int]:
    """What one microbatch's forward of each chunk holds until its backward: under full
    recompute its layers' inputs instead of their saves."""
    if not recomputes(mode):
        return dict(per_chunk)
    return {c: n - stack[c].saved + stack[c].inputs if c in stack else n
            for c, n in per_chunk.items()}
