"""Attach logical axes to parameters: from inside a model (``axes``) or outside (``annotate``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from shardlang.errors import ShardingError, closest
from shardlang.rules import Axes

__all__ = ["axes", "annotate", "logical_axes"]

_ATTR = "_shardlang_axes"


def _check_axes(t: torch.Tensor, names: Sequence[str | None], where: str) -> Axes:
    for n in names:
        if n is not None and not (isinstance(n, str) and n):
            raise ShardingError(
                f"logical axis {n!r} for {where}: a logical axis is a non-empty name or None"
            )
    if len(names) != t.dim():
        raise ShardingError(
            f"{where} has {t.dim()} dims (shape {tuple(t.shape)}) but {len(names)} logical "
            f"axes {tuple(names)}; give one logical axis (or None) per dim"
        )
    named = [n for n in names if n is not None]
    if len(set(named)) != len(named):
        raise ShardingError(f"{where}: logical axes {tuple(names)} name one axis twice")
    return tuple(names)


_T = TypeVar("_T", torch.Tensor, nn.Module)


def _check_stack(m: nn.Module, names: Sequence[str | None], where: str) -> Axes:
    if tuple(names) != ("layers",):
        raise ShardingError(
            f"{where} is a module: a module takes exactly one logical axis, 'layers' (its "
            f"layer stack is split into pipeline stages), got {tuple(names)}")
    if not isinstance(m, (nn.ModuleList, nn.Sequential)):
        raise ShardingError(
            f"{where} is a {type(m).__name__}; mark the nn.ModuleList (or nn.Sequential) "
            "that holds the layers with 'layers'")
    return ("layers",)


def axes(t: _T, *names: str | None) -> _T:
    """Tag a parameter's dims with logical axes, or a layer stack (an ``nn.ModuleList``)
    with ``"layers"`` (what ``pp`` splits into pipeline stages); returns it unchanged.

    Example:
        >>> import torch, shardlang as sl
        >>> w = sl.axes(torch.nn.Parameter(torch.zeros(8, 4)), "mlp", "embed")
        >>> sl.logical_axes(w)
        ('mlp', 'embed')
        >>> blocks = sl.axes(torch.nn.ModuleList([torch.nn.Linear(4, 4)]), "layers")
        >>> sl.logical_axes(blocks)
        ('layers',)
    """
    if isinstance(t, nn.Module):
        object.__setattr__(t, _ATTR, _check_stack(t, names, type(t).__name__))
        return t
    setattr(t, _ATTR, _check_axes(t, names, f"tensor of shape {tuple(t.shape)}"))
    return t


def annotate(module: nn.Module, table: Mapping[str, Sequence[str | None]]) -> nn.Module:
    """Tag parameters of a module you cannot edit, by glob patterns over parameter paths.

    Each pattern (``fnmatch`` syntax: ``*`` matches any run of characters) must match at
    least one parameter; the first pattern that matches a parameter wins. A pattern with
    the axes ``("layers",)`` names the layer stack instead (a module path such as
    ``"model.layers"``), which ``pp`` splits into pipeline stages.

    Example:
        >>> import torch, shardlang as sl
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
        >>> _ = sl.annotate(m, {"0.weight": ("mlp", "embed"), "1.weight": ("embed", "mlp")})
        >>> sl.logical_axes(m[1].weight)
        ('embed', 'mlp')
    """
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    params = dict(module.named_parameters(remove_duplicate=False))
    done: set[str] = set()
    modules = dict(module.named_modules())
    for pattern, names_for in table.items():
        if tuple(names_for) == ("layers",):
            stacks = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
            if len(stacks) != 1:
                hint = closest(pattern, [n for n in modules if n])
                near = f"; did you mean {hint!r}?" if hint else ""
                raise ShardingError(
                    f"annotate pattern {pattern!r} with ('layers',) must name exactly one "
                    f"module of {type(module).__name__} (the layer stack), it matches "
                    f"{len(stacks)}{near}")
            axes(modules[stacks[0]], "layers")
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            hint = closest(pattern, names)
            near = f"; did you mean {hint!r}?" if hint else ""
            raise ShardingError(
                f"annotate pattern {pattern!r} matches no parameter of "
                f"{type(module).__name__}{near}"
            )
        for n in hits:
            if n in done:
                continue
            done.add(n)
            setattr(params[n], _ATTR, _check_axes(params[n], names_for, n))
    return module


def logical_axes(t: torch.Tensor | nn.Module) -> Axes | None:
    """The logical axes attached to a tensor (or a layer stack), or None if never annotated."""
    return getattr(t, _ATTR, None)
