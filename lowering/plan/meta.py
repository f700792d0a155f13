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
Only tensors of at most :data:`LIMIT` elements get shadows, so dry mode stays small, with
two exceptions that cost no memory at any size: a constant fill (``ones``, ``zeros``,
``full`` and their ``_like``/``new_`` forms: its shadow is one element expanded, so an
all-ones attention mask of a 2,048 x 8,192 batch still answers ``mask.all()``), what a
pointwise op or a dtype cast makes of constants (computed on one element, expanded), and
a view of a shadowed tensor. A tensor written in place by an op whose result is not tracked
loses its shadow, so a stale value is never an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

import shardlang as sl
from lowering._torch import TorchDispatchMode, tree_leaves, tree_map

__all__ = ["KnownValues", "LIMIT"]

LIMIT = 1 << 22  # elements: larger meta tensors get no shadow

_aten = torch.ops.aten
_SCALAR = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default}
_RANDOM = {"rand", "randn", "randint", "randperm", "bernoulli", "normal", "uniform", "dropout",
           "multinomial", "exponential", "geometric", "cauchy", "log_normal", "native_dropout"}


def _is_meta(t: object) -> bool:
    return type(t) is torch.Tensor and t.device.type == "meta"


#: constant fills: op name -> where its fill value is (None: the name says, 1 or 0)
_FILLS = {"ones": None, "ones_like": None, "new_ones": None, "zeros": None,
          "zeros_like": None, "new_zeros": None, "full": 1, "full_like": 1, "new_full": 2}


def _is_view(func: Any) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def _fill(func: Any, args: tuple, kwargs: dict) -> object:
    """A constant fill's value, or None when ``func`` is not one."""
    name = func.__name__.split(".")[0]
    if name not in _FILLS:
        return None
    at = _FILLS[name]
    if at is None:
        return 1 if "ones" in name else 0
    value = args[at] if len(args) > at else kwargs.get("fill_value")
    return value if isinstance(value, (bool, int, float)) else None


def _constant(r: torch.Tensor) -> bool:
    """One value everywhere, stored once (a constant fill's shadow)."""
    return r.numel() > 0 and all(st == 0 for st, n in zip(r.stride(), r.shape) if n > 1)


def _one(r: torch.Tensor) -> torch.Tensor:
    return r.as_strided((1,) * r.dim(), (0,) * r.dim())


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

    def _of_constants(self, func: Any, metas: list[torch.Tensor]) -> bool:
        """A pointwise op or a cast, not in place, of shadowed constants only: its result
        is one value everywhere too."""
        return (bool(metas) and not func._schema.is_mutable
                and (torch.Tag.pointwise in func.tags or func is _aten._to_copy.default)
                and all(_constant(self.shadow[m]) for m in metas))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        flat = tree_leaves((args, kwargs))
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
        flat_out = tree_leaves(out)
        outs = [o for o in flat_out if _is_meta(o)]
        real: object = None
        if outs and known and (metas or not func.__name__.startswith("empty")):
            fill = _fill(func, args, kwargs)
            if all(o.numel() <= LIMIT for o in outs) or (_is_view(func) and metas):
                try:
                    real = self._compute(func, args, kwargs)
                except RuntimeError:  # e.g. written in place through an expanded shadow
                    real = None
            elif fill is not None and len(outs) == 1:
                real = torch.tensor(fill, dtype=outs[0].dtype).expand(outs[0].shape)
            elif len(outs) == 1 and self._of_constants(func, metas):
                one = self._compute(func, *tree_map(
                    lambda x: _one(self.shadow[x]) if _is_meta(x) else x, (args, kwargs)))
                real = one.expand(outs[0].shape) if isinstance(one, torch.Tensor) else None
        if real is None:
            for o in outs:  # written without a tracked value (in place): forget the old one
                self.shadow.pop(o, None)
            return out
        for o, r in zip(flat_out, tree_leaves(real)):
            if _is_meta(o) and isinstance(r, torch.Tensor):
                self.shadow[o] = r
        return out
