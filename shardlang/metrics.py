"""Auxiliary losses and per-step metrics a model reports from inside its forward.

A model calls ``sl.aux_loss(x)`` (e.g. an MoE router's load-balancing loss) and
``sl.metric(name, value)`` (e.g. tokens per expert); whoever trains the model collects
them with ``sl.collecting()``. With nobody collecting, both calls do nothing, so a
model still runs as a plain module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["Collected", "aux_loss", "metric", "collecting"]


@dataclass
class Collected:
    aux: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def total_aux(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses (None when there are none)."""
        if not self.aux:
            return None
        total = self.aux[0]
        for a in self.aux[1:]:
            total = total + a
        return total


_STACK: list[Collected] = []


def aux_loss(x: torch.Tensor) -> torch.Tensor:
    """Add a scalar to the training loss of this step; returns ``x``.

    Example:
        >>> import torch, shardlang as sl
        >>> with sl.collecting() as c:
        ...     _ = sl.aux_loss(torch.tensor(0.5))
        >>> float(c.total_aux())
        0.5
    """
    if _STACK:
        _STACK[-1].aux.append(x)
    return x


def metric(name: str, value: torch.Tensor) -> None:
    """Report a value for this step (printed by ``shardlang run``/``simulate``)."""
    if _STACK:
        _STACK[-1].metrics[name] = value.detach()


@contextlib.contextmanager
def collecting() -> Iterator[Collected]:
    """Collect the auxiliary losses and metrics reported inside the block."""
    c = Collected()
    _STACK.append(c)
    try:
        yield c
    finally:
        _STACK.pop()
