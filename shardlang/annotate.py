"""Attach logical axes to parameters: from inside a model (``axes``) or outside (``annotate``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from shardlang.errors import ShardingError, closest
from shardlang.ops import constrain
from shardlang.rules import Axes

__all__ = ["axes", "annotate", "logical_axes", "activation_axes", "no_tensor_split", "tensor_split_refusal"]

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


def annotate(module: nn.Module, table: Mapping[str, Sequence[str | None]] | None = None, *,
             inputs: Mapping[str, Sequence[str | None]] | None = None,
             outputs: Mapping[str, Sequence[str | None]] | None = None) -> nn.Module:
    """Tag parameters of a module you cannot edit, by glob patterns over parameter paths;
    optionally constrain activations from outside too.

    ``inputs`` / ``outputs`` map module-path globs (here ``*`` matches one path
    component: ``"layers.*"`` is every layer, not their submodules) to the logical axes
    of that module's first tensor input / output: the module then runs as if its code
    began with ``x = sl.constrain(x, *axes)`` (or ended with it). This is how a
    third-party model reaches Megatron's minimum under ``tp``: constrain the input and
    output of each attention and MLP block to ``("batch", "seq", "embed")``.

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
        >>> _ = sl.annotate(m, outputs={"1": ("batch", "embed")})
        >>> m(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """
    _annotate_params(module, table or {})
    modules = dict(module.named_modules())
    for side, given in (("inputs", inputs), ("outputs", outputs)):
        for pattern, names_for in (given or {}).items():
            for path, mod in _modules_matching(module, modules, pattern, side):
                _constrain_at(mod, path, side, tuple(names_for))
    return module


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _matching(pattern: str, names: Sequence[str], exact: Mapping[str, object]) -> list[str]:
    """The names ``pattern`` (fnmatch syntax) matches; a pattern without wildcards is one
    dictionary lookup (a Hugging Face model's table names hundreds of exact paths)."""
    if not _is_glob(pattern):
        return [pattern] if pattern in exact else []
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _annotate_params(module: nn.Module, table: Mapping[str, Sequence[str | None]]) -> None:
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    params = dict(module.named_parameters(remove_duplicate=False))
    done: set[str] = set()
    modules = dict(module.named_modules())
    for pattern, names_for in table.items():
        if tuple(names_for) == ("layers",):
            stacks = [n for n in _matching(pattern, list(modules), modules) if n]
            if len(stacks) != 1:
                hint = closest(pattern, [n for n in modules if n])
                near = f"; did you mean {hint!r}?" if hint else ""
                raise ShardingError(
                    f"annotate pattern {pattern!r} with ('layers',) must name exactly one "
                    f"module of {type(module).__name__} (the layer stack), it matches "
                    f"{len(stacks)}{near}")
            axes(modules[stacks[0]], "layers")
            continue
        hits = _matching(pattern, names, params)
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


# -- activation constraints from outside -------------------------------------------------
_SIDES = {"inputs": "_shardlang_inputs", "outputs": "_shardlang_outputs"}


def _module_glob(pattern: str) -> re.Pattern[str]:
    """A module-path glob: ``*`` is one path component, ``**`` any number of them."""
    parts = []
    for piece in re.split(r"(\*\*|\*|\?)", pattern):
        parts.append({"**": r".*", "*": r"[^.]+", "?": r"[^.]"}.get(piece, re.escape(piece)))
    return re.compile("".join(parts) + r"\Z")


def _modules_matching(module: nn.Module, modules: Mapping[str, nn.Module], pattern: str,
                      side: str) -> list[tuple[str, nn.Module]]:
    if not _is_glob(pattern):
        found = [(pattern, modules[pattern])] if pattern in modules else []
    else:
        rx = _module_glob(pattern)
        found = [(n, m) for n, m in modules.items() if rx.match(n)]
    if not found:
        hint = closest(pattern, [n for n in modules if n])
        near = f"; did you mean {hint!r}?" if hint else ""
        raise ShardingError(
            f"annotate {side} pattern {pattern!r} matches no module of "
            f"{type(module).__name__} (in module paths '*' matches one component, '**' "
            f"several){near}")
    return found


def _first_tensor(values: Sequence[object]) -> int | None:
    return next((i for i, v in enumerate(values) if isinstance(v, torch.Tensor)), None)


def _constrained(x: torch.Tensor, names: Axes, where: str) -> torch.Tensor:
    if x.dim() != len(names):
        raise ShardingError(
            f"sl.annotate gave {where} the logical axes {names}, but it is a tensor of shape "
            f"{tuple(x.shape)} ({x.dim()} dims); give one logical axis (or None) per dim")
    return constrain(x, *names)


def _on_input(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    names, where = getattr(mod, _SIDES["inputs"])
    i = _first_tensor(args)
    if i is not None:
        args = (*args[:i], _constrained(args[i], names, where), *args[i + 1:])
        return args, kwargs
    keys = list(kwargs)
    j = _first_tensor([kwargs[k] for k in keys])
    if j is None:
        return None
    return args, {**kwargs, keys[j]: _constrained(kwargs[keys[j]], names, where)}


def _on_output(mod: nn.Module, args: tuple, out: object) -> object:
    names, where = getattr(mod, _SIDES["outputs"])
    if isinstance(out, torch.Tensor):
        return _constrained(out, names, where)
    if isinstance(out, (tuple, list)):
        i = _first_tensor(out)
        if i is None:
            return out
        new = [*out[:i], _constrained(out[i], names, where), *out[i + 1:]]
        return type(out)(new) if isinstance(out, list) else tuple(new)
    if isinstance(out, Mapping):  # an output object (Hugging Face's ModelOutput is a dict)
        keys = list(out)
        j = _first_tensor([out[k] for k in keys])
        if j is not None:
            out[keys[j]] = _constrained(out[keys[j]], names, where)  # type: ignore[index]
    return out


def _constrain_at(mod: nn.Module, path: str, side: str, names: Axes) -> None:
    for n in names:
        if n is not None and not (isinstance(n, str) and n):
            raise ShardingError(
                f"logical axis {n!r} for the {side[:-1]} of {path or 'the model'}: a logical "
                "axis is a non-empty name or None")
    attr = _SIDES[side]
    had = hasattr(mod, attr)
    what = "first tensor input" if side == "inputs" else "first tensor output"
    object.__setattr__(mod, attr, (names, f"the {what} of {path or type(mod).__name__}"))
    if had:  # annotating again replaces the axes; the hook is already there
        return
    if side == "inputs":
        mod.register_forward_pre_hook(_on_input, with_kwargs=True)
    else:
        mod.register_forward_hook(_on_output)


def activation_axes(mod: nn.Module) -> tuple[Axes | None, Axes | None]:
    """The (input, output) logical axes ``annotate`` gave a module (None where none)."""
    got = [getattr(mod, _SIDES[s], None) for s in ("inputs", "outputs")]
    return (got[0][0] if got[0] else None, got[1][0] if got[1] else None)


def logical_axes(t: torch.Tensor | nn.Module) -> Axes | None:
    """The logical axes attached to a tensor (or a layer stack), or None if never annotated."""
    return getattr(t, _ATTR, None)


_NO_SPLIT = "_shardlang_no_tensor_split"


def no_tensor_split(module: nn.Module, why: str) -> nn.Module:
    """Mark a model whose linears carry no tensor-parallel axes because nobody said how to
    split them (a Hugging Face architecture without a tp plan): every axis but ``tp``
    still works, and a mesh with ``tp > 1`` is refused with ``why`` (what to annotate)
    instead of running with replicated linears."""
    object.__setattr__(module, _NO_SPLIT, why)
    return module


def tensor_split_refusal(module: nn.Module) -> str | None:
    """The reason :func:`no_tensor_split` gave, or None."""
    return getattr(module, _NO_SPLIT, None)
