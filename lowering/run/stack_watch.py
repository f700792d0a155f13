"""Dry mode: what each layer of the stack costs in the forward, for the prediction of
activation recompute (:mod:`lowering.plan.recompute`).

Hooks on every layer of a stage's stack read, around the layer's forward, the recorder's
compute and records and the memory meter's saved bytes, and the bytes of the layer's
input. A dry trace runs one microbatch per chunk (the others replay its records), so the
hooks see each chunk once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lowering.plan import Pipe, StackCost, hidden_key, layer_stack
from lowering.run.memory import MemoryMeter
from lowering.schedule import Cost, Recorder

__all__ = ["StackWatch"]


class StackWatch:
    """``blocks``: pipeline rank -> (layer index -> layer) it runs; ``stack`` after the
    trace: pipeline rank -> chunk -> :class:`StackCost`."""

    def __init__(self, blocks: Mapping[int, Mapping[int, nn.Module]], pipe: Pipe | None,
                 meter: MemoryMeter, recs: Mapping[int, Recorder], n_layers: int) -> None:
        self.meter, self.recs = meter, recs
        self.stack: dict[int, dict[int, StackCost]] = {r: {} for r in blocks}
        self._handles = []
        for r, layers in blocks.items():
            chunk_of = {i: c for c in (pipe.chunks_of(r) if pipe else [0])
                        for i in (pipe.layers_of(c, n_layers) if pipe else range(n_layers))}
            for i, layer in layers.items():
                self._watch(r, chunk_of[i], layer)

    @classmethod
    def of_model(cls, model: nn.Module, meter: MemoryMeter, rec: Recorder) -> StackWatch | None:
        """A model without a pipeline (None when it has no layer stack)."""
        found = layer_stack(model)
        if found is None:
            return None
        _, stack = found
        return cls({0: dict(enumerate(stack))}, None, meter, {0: rec}, len(stack))

    def _watch(self, r: int, chunk: int, layer: nn.Module) -> None:
        start: list[tuple[int, Cost, int, int]] = []

        def before(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            rec = self.recs[r]
            start.append((self.meter.live(r)[0], rec.compute_total(), len(rec.records)))

        def after(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            if not start:
                return
            live0, cost0, n0 = start.pop()
            rec = self.recs[r]
            # the input as the layer got it (a pipeline's pre-hook swaps in the received one)
            x = args[0] if args else kwargs[hidden_key(kwargs)]
            self.stack[r].setdefault(chunk, StackCost()).add(
                rec.compute_total() - cost0, rec.records[n0:],
                self.meter.live(r)[0] - live0, self.meter.held_bytes(x))

        self._handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                          layer.register_forward_hook(after, with_kwargs=True)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
