"""Known values: how dry mode answers data-dependent questions on meta tensors.

A meta tensor has a shape and a dtype but no values, so ``bool(t.all())``, ``t.item()``
or ``t.nonzero()`` cannot be answered on one. Real model code asks such questions about
tensors that do not depend on the parameters: positions (``arange``), masks built from
them, ``cache_position`` (Hugging Face's mask code checks whether the positions are one
packed sequence). :class:`KnownValues` keeps, beside every small meta tensor computed
only from constants and factory calls (``arange``, ``zeros``, ``full``, ...), its real
value on the CPU (a *shadow*), and answers those questions from it.

What it assumes: a value that is known in dry mode is the value the real run computes.
That holds for everything derived from shapes and constants, which is all it tracks;
a tensor computed from parameters, token ids or random numbers has no shadow, and a
data-dependent question about it is a :class:`shardlang.ShardingError` that names the
module and the op (such a model needs data-dependent shapes: simulate it instead).
Only tensors of at most :data:`LIMIT` elements get shadows, so dry mode stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

import shardlang as sl
from lowering._torch import TorchDispatchMode, tree_flatten, tree_map

__all__ = ["KnownValues", "LIMIT"]

LIMIT = 1 << 22  # elements: larger meta tensors get no shadow

_aten = torch.ops.aten
_SCALAR = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default}
_RANDOM = {"rand", "randn", "randint", "randperm", "bernoulli", "normal", "uniform", "dropout",
           "multinomial", "exponential", "geometric", "cauchy", "log_normal", "native_dropout"}


def _is_meta(t: object) -> bool:
    return type(t) is torch.Tensor and t.device.type == "meta"


def _is_random(func: Any) -> bool:
    name = func.__name__.split(".")[0].rstrip("_")
    return name in _RANDOM or name.startswith("rand")


class KnownValues(TorchDispatchMode):
    """While active, small meta tensors computed from constants carry their real values,
    and data-dependent ops on them are answered from those values (see the module doc).
    ``where()`` names the running module for the error of an unanswerable question."""

    def __init__(self, where: Callable[[], str] = lambda: "the model") -> None:
        super().__init__()
        self.where = where
        self.shadow: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """The known value of a meta tensor, or None."""
        return self.shadow.get(t)

    def _real(self, x: object) -> object:
        if isinstance(x, torch.device) and x.type == "meta":
            return torch.device("cpu")
        return self.shadow[x] if _is_meta(x) else x

    def _known(self, flat: list[object]) -> bool:
        return all(not _is_meta(a) or a in self.shadow for a in flat)

    def _compute(self, func: Any, args: tuple, kwargs: dict) -> object:
        with torch.no_grad():
            return func(*tree_map(self._real, args), **tree_map(self._real, kwargs))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in flat):
            return func(*args, **kwargs)  # a tensor subclass (DTensor) decides for itself
        metas = [a for a in flat if _is_meta(a)]
        known = self._known(flat) and not _is_random(func)
        if func in _SCALAR or func is _aten.nonzero.default:
            if not metas:
                return func(*args, **kwargs)
            if not known:
                raise sl.ShardingError(
                    f"{self.where()} asks a data-dependent question ({func.__name__}) about "
                    "a tensor computed from parameters or data, which dry mode (meta tensors, "
                    "no values) cannot answer: this model needs real values to decide its "
                    "shapes. Trace it with 'shardlang simulate' (real values) instead, or "
                    "keep such decisions on values derived from shapes and constants")
            real = self._compute(func, args, kwargs)
            if func in _SCALAR:
                return real
            out = torch.empty_like(real, device="meta")  # nonzero: its shape is the answer
            self.shadow[out] = real
            return out
        out = func(*args, **kwargs)
        outs = [o for o in tree_flatten(out)[0] if _is_meta(o)]
        if outs and known and all(o.numel() <= LIMIT for o in outs) and (
                metas or not func.__name__.startswith("empty")):
            real = self._compute(func, args, kwargs)
            for o, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                if _is_meta(o) and isinstance(r, torch.Tensor):
                    self.shadow[o] = r
        return out
