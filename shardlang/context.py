"""The one hook between the pure DSL and a lowering: the active lowering context.

With no active context every model-side call has single-device semantics. During a
lowered run, ``lowering`` installs an object that implements :class:`LoweringContext`
and every call in :mod:`shardlang.ops` dispatches to it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from shardlang.rules import Axes

__all__ = ["Comm", "LoweringContext", "active", "activate"]


class Comm(enum.Enum):
    """The explicit collectives of the local (shard_map) view."""

    PSUM = "psum"
    ALL_GATHER = "all_gather"
    PSUM_SCATTER = "psum_scatter"
    ALL_TO_ALL = "all_to_all"
    PPERMUTE = "ppermute"


#: in_axes / out_axes of a shard_map: logical axes per tensor (None: not a tensor / replicated).
MapAxes = Sequence[Axes | None] | Axes


class LoweringContext(Protocol):
    """What a lowering provides while a model runs under a plan."""

    def constrain(self, x: torch.Tensor, axes: Axes) -> torch.Tensor: ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  causal: bool, scale: float | None) -> torch.Tensor: ...

    def shard_map(self, fn: Callable[..., object], in_axes: Sequence[Axes | None],
                  out_axes: MapAxes, args: tuple[object, ...]) -> object: ...

    def collective(self, comm: Comm, x: torch.Tensor, axis: str, *, dim: int = 0,
                   split_dim: int = 0, concat_dim: int = 0, shift: int = 1) -> torch.Tensor: ...

    def axis_index(self, axis: str) -> torch.Tensor: ...

    def positions(self, n: int, device: torch.device | str | None) -> torch.Tensor: ...


_ACTIVE: list[LoweringContext] = []


def active() -> LoweringContext | None:
    """The innermost active lowering context, or None (single-device semantics)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def activate(ctx: LoweringContext | None) -> Iterator[LoweringContext | None]:
    """Make ``ctx`` the active lowering context for the duration of the block (None:
    single-device semantics inside it, as a forward on local tensors needs)."""
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()
