"""Weights read where they are used: a factory tags a parameter with a reader of any block
of its values, and the lowering reads on each rank only the block that rank holds.

A factory that can read slices of its checkpoint (safetensors can) asks
:func:`reading_later`: when the model is being built to be distributed, it tags each
parameter with :func:`read_from` instead of copying the whole tensor, and each rank then
reads only its own shard. Anywhere else (one device, the single-device reference of a
``--check``) it reads whole tensors as usual.

Example:
    >>> import torch, shardlang as sl
    >>> w = torch.nn.Parameter(torch.zeros(4, 2))
    >>> full = torch.arange(8.0).reshape(4, 2)
    >>> _ = sl.read_from(w, lambda block: full[block])
    >>> sl.reader_of(w)((slice(2, 4), slice(0, 2))).tolist()
    [[4.0, 5.0], [6.0, 7.0]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["read_from", "reader_of", "reading_later", "read_later", "Reader"]

#: reads the block of a parameter given one slice per dim (of the parameter as the model
#: holds it), returning a tensor of that block's shape
Reader = Callable[[tuple[slice, ...]], torch.Tensor]
_ATTR = "_shardlang_reader"
_LATER = [False]
_T = TypeVar("_T", bound=torch.Tensor)


def read_from(t: _T, read: Reader) -> _T:
    """Tag a parameter with the reader of its values (see the module doc)."""
    setattr(t, _ATTR, read)
    return t


def reader_of(t: torch.Tensor) -> Reader | None:
    """The reader a factory tagged ``t`` with, or None."""
    return getattr(t, _ATTR, None)


def reading_later() -> bool:
    """True while a model is being built to be distributed: tag, do not read."""
    return _LATER[0]


@contextlib.contextmanager
def read_later() -> Iterator[None]:
    """Build models in this block to be distributed (the lowering reads their shards)."""
    before, _LATER[0] = _LATER[0], True
    try:
        yield
    finally:
        _LATER[0] = before
