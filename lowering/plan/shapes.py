"""A shape check before anything is distributed: run the model once on meta tensors with
single-device semantics, checking at every ``constrain``, ``attention`` and
``shard_map`` that the mesh axes divide the dims they would shard.

This finds the real constraint behind a layout (4 attention heads allow tp in {1, 2,
4}, even though the fused 64-wide projection weight would split 8 ways), names the
module, and costs no memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import shardlang as sl
from lowering._torch import ModTracker, module_tracker
from lowering.plan.meta import KnownValues
from lowering.schedule.recorder import running_module

__all__ = ["ShapeTrace", "check_activations", "sdpa_as_attention"]


class _ShapeCheck:
    """A lowering context with single-device semantics that only validates shapes."""

    def __init__(self, mesh: sl.Mesh, rules: sl.Rules, tracker: ModTracker) -> None:
        self.mesh, self.rules, self.tracker = mesh, rules, tracker
        self.names: set[str] = set()  # logical axes the model's activations use
        self.attention_shapes: list[tuple[int, ...]] = []  # global key shape per attention call
        self.shard_map_modules: set[str] = set()  # modules whose forward runs a shard_map
        self.computing = False  # inside attention's own sdpa call

    def _module(self) -> str:
        return running_module(self.tracker.parents)

    def where_module(self) -> str:
        return self._module() or "the model"

    def _where(self, what: str) -> str:
        return f"{what} in {self._module() or 'the model'}"

    def _check(self, x: torch.Tensor, axes: sl.Axes, what: str) -> None:
        where = self._where(what)
        self.names.update(a for a in axes if a)
        spec = self.rules.spec(axes, where=where)
        sl.rules.check_divisible(x.shape, axes, spec, self.mesh, where=where)

    def constrain(self, x: torch.Tensor, axes: sl.Axes) -> torch.Tensor:
        self._check(x, axes, f"activation {axes}")
        return x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  causal: bool, scale: float | None) -> torch.Tensor:
        self._check(q, ("batch", "heads", "seq", None), "attention")
        self._check(k, ("batch", "heads", "seq", None), "the key/value heads of attention")
        self.attention_shapes.append(tuple(k.shape))  # what the ring carries (GQA: fewer heads)
        self.computing = True
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        finally:
            self.computing = False


    def shard_map(self, fn: Callable[..., object], in_axes: Sequence[sl.Axes | None],
                  out_axes: object, args: tuple[object, ...]) -> object:
        name = getattr(fn, "__name__", "fn")
        self.shard_map_modules.add(self._module())
        for i, (a, axes) in enumerate(zip(args, in_axes)):
            if axes is not None and isinstance(a, torch.Tensor) and len(axes) == a.dim():
                self._check(a, tuple(axes), f"shard_map({name}) argument {i}")
        return fn(*args)

    def collective(self, comm: sl.Comm, x: torch.Tensor, axis: str, **kw: int) -> torch.Tensor:
        return x

    def axis_index(self, axis: str) -> torch.Tensor:
        return torch.tensor(0)

    def positions(self, n: int, device: torch.device | str | None) -> torch.Tensor:
        return torch.arange(n, device=device)


class _SdpaAsAttention(TorchFunctionMode):
    """In the shape check, a model's own ``F.scaled_dot_product_attention`` call (as Hugging
    Face's default attention makes) is checked as ``sl.attention`` is: under a plan it
    runs as one (:func:`sdpa_as_attention`)."""

    def __init__(self, check: _ShapeCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        call = sdpa_as_attention(func, args, kwargs)
        if call is not None and call[5] is None and not self.check.computing:
            q, k, v, causal, scale, _ = call  # (with a mask: global view, nothing to check)
            names = set(self.check.names)  # the model's own call constrains nothing itself:
            try:  # its names must not turn off the automatic conversion points
                return self.check.attention(q, k, v, causal=causal, scale=scale)
            finally:
                self.check.names = names
        return func(*args, **kwargs)


def sdpa_as_attention(func: object, args: tuple, kwargs: dict
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, float | None,
                                 torch.Tensor | None] | None:
    """``(q, k, v, causal, scale, mask)`` when ``func(*args, **kwargs)`` is a
    scaled-dot-product attention that ``sl.attention`` computes the same (4-D, no
    dropout), else None."""
    if func is not F.scaled_dot_product_attention or len(args) < 3:
        return None
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    extra = dict(zip(names, args[3:])) | kwargs
    q, k, v = args[:3]
    if extra.get("dropout_p", 0.0) or any(
            not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        return None
    if q.shape[1] != k.shape[1] and not extra.get("enable_gqa", False):
        return None
    return (q, k, v, bool(extra.get("is_causal", False)), extra.get("scale"),
            extra.get("attn_mask"))


@dataclass(frozen=True)
class ShapeTrace:
    """What one forward on meta tensors saw: activation logical axes, attention shapes."""

    names: frozenset[str] = frozenset()
    attention: tuple[tuple[int, ...], ...] = ()  # global (batch, kv heads, seq, head_dim) per call
    shard_map_modules: frozenset[str] = frozenset()
    ran: bool = False  # the whole forward ran on meta tensors


def check_activations(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules, *, batch: int,
                      seq: int) -> ShapeTrace:
    """Raise the first ShardingError a (batch, seq) step would hit; ignore anything else
    (a model that cannot run on meta tensors is checked later, by the dry trace)."""
    params = {n: torch.empty_like(p, device="meta")
              for n, p in model.named_parameters()}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    tracker = module_tracker()
    check = _ShapeCheck(mesh, rules, tracker)
    ran = False
    try:
        with tracker, sl.activate(check), KnownValues(check.where_module), \
                _SdpaAsAttention(check), torch.no_grad():
            functional_call(model, {**params, **buffers}, (idx,), tie_weights=True)
        ran = True
    except sl.ShardingError:
        raise
    except Exception:  # noqa: BLE001 - reported by the dry trace with full context
        pass
    return ShapeTrace(frozenset(check.names), tuple(check.attention_shapes),
                      frozenset(check.shard_map_modules), ran)
