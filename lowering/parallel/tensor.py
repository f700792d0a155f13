"""Tensor parallelism (``tp``): Megatron's column- and row-parallel linears, the
vocab-parallel embedding and loss, from logical axes alone.

| piece                      | forward                              | backward                              |
|----------------------------|--------------------------------------|---------------------------------------|
| column-parallel input      | replicated input, one pin per tensor | all-reduce the Partial grad (Megatron "f") |
| column-parallel linear     | local matmul, output Shard(last)     | grad x Partial, grad w Shard(0)       |
| row-parallel linear        | local matmul, output Partial         | grad x Shard(last), grad w Shard(1)   |
| row-parallel output        | all-reduce (Megatron "g")            | identity                              |
| vocab-parallel embedding   | masked lookup, all-reduce            | identity                              |
| vocab-parallel loss        | 3 all-reduces (max, sum-exp, target) | local                                 |

The conversion points are :func:`relayout` calls: the model's own ``sl.constrain`` where
it has them (``models/gpt.py``: one per block input and output). A model that constrains
no activation at all gets them from its roles (:func:`install_tp_hooks`): every
column-parallel linear's input is pinned once per distinct input tensor, so q, k and v
share one backward all-reduce, and every row-parallel output is reduced at once. Either
way a transformer layer costs Megatron's 2 all-reduces forward and 2 backward.

``F.linear`` on DTensors runs on local blocks (:class:`LocalOps`), per mesh dim:

| input x            | weight w          | output y      | grad x   | grad w   |
|--------------------|-------------------|---------------|----------|----------|
| Shard(d), d < last | Replicate         | Shard(d)      | Shard(d) | Partial  |
| Replicate          | Shard(0) (column) | Shard(last)   | Partial  | Shard(0) |
| Shard(last)        | Shard(1) (row)    | Partial       | Shard    | Shard(1) |
| Replicate          | Replicate         | Replicate     | -        | -        |

(ATen would fold (batch, seq) into one dim, and with batch and seq on two mesh axes
DTensor then searches every redistribution: minutes per op.) Any other combination goes
to DTensor. A reshape that would split a sharded dim unevenly (4 heads of a 2-head key
projection) is a ShardingError naming the module and the sizes that work.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

import shardlang as sl
from lowering._torch import host_values, loss_parallel, loss_parallel_active
from lowering.plan import Plan, Role, contiguous_stride, sdpa_as_attention
from lowering.schedule import site
from shardlang.errors import divisors

__all__ = ["LocalOps", "relayout", "install_tp_hooks", "loss_scope", "loss_parallel_needed",
           "user_cross_entropy",
           "next_token_loss", "logits_of"]

_PINNED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # relayout outputs: conversion points


def relayout(x: DTensor, dmesh: DeviceMesh, pl: Sequence[Placement]) -> DTensor:
    """Redistribute ``x`` to ``pl`` and pin its gradient to the same layout: a ``Partial``
    gradient arriving here is summed here, once (Megatron's "f" in backward), instead
    of travelling on to wherever DTensor would next need it.

    Where the forward gathers (``Shard`` -> ``Replicate``, Megatron-SP's all-gather before
    a column-parallel linear), a ``Partial`` gradient is left partial so the gather's
    own backward reduce-scatters it: a reduce-scatter, not an all-reduce and a slice.
    """
    pl = tuple(pl)
    src = tuple(x.placements)
    y = x if src == pl else x.redistribute(dmesh, pl)
    grad_pl = tuple(Partial() if isinstance(s, Shard) and d.is_replicate() else d
                    for s, d in zip(src, pl))
    out = DTensor.from_local(y.to_local(grad_placements=grad_pl), dmesh, pl, run_check=False,
                             shape=y.shape, stride=y.stride(), grad_placements=grad_pl)
    _PINNED[out] = True
    return out


# -- automatic conversion points ----------------------------------------------------------------
def _reduce_partial(mod: nn.Module, args: object, out: object) -> object:
    """A row-parallel (or vocab-parallel lookup) output is a partial sum: reduce it at
    once, before the model can read it twice (a norm does), and pin its gradient."""
    t = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(t, DTensor) or not any(p.is_partial() for p in t.placements):
        return out
    reduced = relayout(t, t.device_mesh, [Replicate() if p.is_partial() else p
                                          for p in t.placements])
    return (reduced, *out[1:]) if isinstance(out, (tuple, list)) else reduced


class _PinInput:
    """A column-parallel linear's input, pinned once per distinct input tensor: q, k and v
    reading one normed hidden state share one conversion point, so one backward
    all-reduce sums their three partial gradients."""

    def __init__(self) -> None:
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __call__(self, mod: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], DTensor) or args[0] in _PINNED:
            return None
        x = args[0]
        pinned = self.seen.get(x)
        if pinned is None:
            pinned = relayout(x, x.device_mesh, x.placements)
            self.seen[x] = pinned
        return (pinned, *args[1:])


def install_tp_hooks(model: nn.Module, plan: Plan) -> None:
    """The conversion points a model does not write itself (see this module's doc): the
    vocab-parallel lookup's reduction always; for a model that constrains no activation,
    a pin at every column-parallel input and a reduction at every row-parallel output."""
    modules = dict(model.named_modules())
    roles: dict[nn.Module, set[Role]] = {}
    for p in plan.params:
        owner = modules.get(p.name.rpartition(".")[0])
        if owner is not None:
            roles.setdefault(owner, set()).add(p.role)
    automatic = not plan.trace.names
    pin = _PinInput()
    for mod, rs in roles.items():
        if Role.VOCAB in rs and isinstance(mod, nn.Embedding):
            mod.register_forward_hook(_reduce_partial)
        elif automatic and Role.ROW in rs:
            mod.register_forward_hook(_reduce_partial)
        elif automatic and Role.COLUMN in rs:
            mod.register_forward_pre_hook(pin)


# -- F.linear on local blocks, and reshapes of sharded dims ---------------------------------------
def _linear_plan(x: DTensor, w: DTensor
                 ) -> tuple[list[Placement], list[Placement], list[Placement]] | None:
    """(output, grad-x, grad-w) placements per mesh dim, or None to leave it to DTensor."""
    last = x.dim() - 1
    y_pl: list[Placement] = []
    gx: list[Placement] = []
    gw: list[Placement] = []
    for px, pw in zip(x.placements, w.placements):
        if isinstance(px, Shard) and px.dim < last and pw.is_replicate():
            y_pl.append(px), gx.append(px), gw.append(Partial())
        elif px.is_replicate() and isinstance(pw, Shard) and pw.dim == 0:
            y_pl.append(Shard(last)), gx.append(Partial()), gw.append(pw)
        elif isinstance(px, Shard) and px.dim == last and isinstance(pw, Shard) and pw.dim == 1:
            y_pl.append(Partial()), gx.append(px), gw.append(pw)
        elif px.is_replicate() and pw.is_replicate():
            y_pl.append(Replicate()), gx.append(Replicate()), gw.append(Replicate())
        else:
            return None
    return y_pl, gx, gw


def _linear(x: DTensor, w: DTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    if w.dim() != 2 or x.dim() < 2 or x.device_mesh != w.device_mesh:
        return None
    plan = _linear_plan(x, w)
    if plan is None:
        return None
    y_pl, gx, gw = plan
    y_local = F.linear(x.to_local(grad_placements=gx), w.to_local(grad_placements=gw))
    shape = torch.Size((*x.shape[:-1], w.shape[0]))
    y = DTensor.from_local(y_local, x.device_mesh, y_pl, run_check=False, shape=shape,
                           stride=contiguous_stride(shape))
    return y if bias is None else y + bias


_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


def _sizes(x: torch.Tensor, args: Sequence[object]) -> list[int] | None:
    sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
    if not all(isinstance(s, int) for s in sizes):
        return None
    out = [int(s) for s in sizes]  # type: ignore[arg-type]
    if out.count(-1) == 1:
        known = math.prod(s for s in out if s != -1)
        out[out.index(-1)] = x.numel() // known if known else 0
    return out if math.prod(out) == x.numel() else None


def _split_targets(ins: Sequence[int], outs: Sequence[int]) -> dict[int, int]:
    """For each input dim that a reshape splits into several output dims, the first of
    them (the one a shard of the input dim lands on)."""
    out: dict[int, int] = {}
    i = j = 0
    while i < len(ins) and j < len(outs):
        a, b, i0, j0 = ins[i], outs[j], i, j
        while a != b:
            if a < b:
                i += 1
                a *= ins[i]
            else:
                j += 1
                b *= outs[j]
        if i == i0 and j > j0:
            out[i0] = j0
        i, j = i + 1, j + 1
    return out


def check_reshape(x: DTensor, sizes: list[int], where: str) -> None:
    """A reshape that splits a sharded dim must keep the shard on its leading factor."""
    targets = _split_targets(list(x.shape), sizes)
    names = x.device_mesh.mesh_dim_names or ()
    for mesh_dim, p in enumerate(x.placements):
        if not isinstance(p, Shard) or p.dim not in targets:
            continue
        n, lead = x.device_mesh.size(mesh_dim), sizes[targets[p.dim]]
        if lead % n:
            axis = names[mesh_dim] if mesh_dim < len(names) else str(mesh_dim)
            raise sl.ShardingError(
                f"mesh axis {axis!r} (size {n}) shards dim {p.dim} (size {x.shape[p.dim]}) of a "
                f"tensor that {where} reshapes {list(x.shape)} -> {sizes}: the sharded dim "
                f"splits into {sizes[targets[p.dim]]} x ..., and {axis} must divide the "
                f"leading {lead} (the key/value heads, for attention); choose {axis} in "
                f"{{{', '.join(map(str, divisors(lead)))}}}")


class LocalOps(TorchFunctionMode):
    """While active, ``F.linear`` on DTensors follows the table in this module's doc, and
    a reshape of a sharded dim is checked (``where()`` names the running module)."""

    def __init__(self, where: Callable[[], str] = lambda: "the model") -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None:
            # a draw from the user's own generator happens once, as on each real rank (in
            # simulate mode it would otherwise advance the generator once per simulated rank)
            with host_values():
                return func(*args, **kwargs)
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, DTensor) and isinstance(w, DTensor) and (
                    bias is None or isinstance(bias, DTensor)):
                out = _linear(x, w, bias)
                if out is not None:
                    return out
        elif func is F.scaled_dot_product_attention:
            call = sdpa_as_attention(func, args, kwargs)
            ctx = sl.active()
            if call is not None and ctx is not None and isinstance(call[0], DTensor):
                q, k, v, causal, scale, mask = call  # a model's own sdpa: shardlang's attention
                return sl.attention(q, k, v, causal=causal, scale=scale, mask=mask)
        elif func is F.cross_entropy and args and isinstance(args[0], DTensor) and \
                not loss_parallel_active():
            return user_cross_entropy(*args, **kwargs)
        elif func is torch.cat and args and isinstance(args[0], (list, tuple)):
            parts = list(args[0])
            if any(isinstance(t, DTensor) for t in parts) and any(
                    not isinstance(t, DTensor) and t.numel() == 0 for t in parts):
                # an empty plain tensor (a fresh key/value cache) adds nothing: drop it
                parts = [t for t in parts if isinstance(t, DTensor) or t.numel() > 0]
                return func(parts, *args[1:], **kwargs)
        elif func in _RESHAPES and args and isinstance(args[0], DTensor) and not kwargs:
            sizes = _sizes(args[0], args[1:])
            if sizes is not None:
                check_reshape(args[0], sizes, self.where())
        return func(*args, **kwargs)


# -- the loss ---------------------------------------------------------------------------------
def loss_scope(logits: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where the loss and its backward run: torch's vocab-parallel cross-entropy
    (``loss_parallel``: local log-softmax with all-reduced max and sum, no gathered
    logits) when the vocab dim is sharded. Backward must run inside it too."""
    vocab_sharded = isinstance(logits, DTensor) and any(
        isinstance(p, Shard) and p.dim == logits.dim() - 1 for p in logits.placements
    )
    return loss_parallel() if vocab_sharded else contextlib.nullcontext()


class _VocabParallel(torch.autograd.Function):
    """``fn(logits)`` and its backward both inside torch's ``loss_parallel`` (which must
    see the backward too), for a loss the user calls outside any scope of ours."""

    @staticmethod
    def forward(ctx, logits: DTensor, fn: Callable[[DTensor], DTensor]) -> DTensor:  # noqa: ANN001
        x = logits.detach().requires_grad_(logits.requires_grad)
        with torch.enable_grad(), loss_parallel():
            out = fn(x)
        ctx.x, ctx.out = x, out
        return out.detach()

    @staticmethod
    def backward(ctx, g: DTensor):  # noqa: ANN001, ANN205
        with loss_parallel():
            (gx,) = torch.autograd.grad(ctx.out, ctx.x, g)
        return gx, None


def user_cross_entropy(input: DTensor, target: torch.Tensor,  # noqa: A002
                       weight: torch.Tensor | None = None, size_average: object = None,
                       ignore_index: int = -100, reduce: object = None,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """A user's ``F.cross_entropy`` on DTensor logits, on any mesh: where the class dim is
    sharded it runs vocab-parallel (torch's ``loss_parallel``: no gathered logits); the
    mean is the sum over the count of counted targets (``loss_parallel`` takes a mean on
    one-dimensional meshes only)."""
    if size_average is not None or reduce is not None:  # torch's deprecated spelling
        reduction = "none" if reduce is False else "sum" if size_average is False else "mean"
    class_dim = 1 if input.dim() > 1 else 0
    sharded = any(isinstance(p, Shard) and p.dim == class_dim for p in input.placements)
    inner = "sum" if reduction == "mean" else reduction

    def loss(x: DTensor) -> DTensor:
        return F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index,
                               reduction=inner, label_smoothing=label_smoothing)

    if sharded and label_smoothing:
        # torch's loss_parallel fails to smooth labels with reduction="sum" (an in-place
        # masked_fill on a Partial sum): gather the class dim (correct, not vocab-parallel)
        pl = [Replicate() if isinstance(p, Shard) and p.dim == class_dim else p
              for p in input.placements]
        with site("loss"):
            input = input.redistribute(input.device_mesh, pl)
        sharded = False
    total = _VocabParallel.apply(input, loss) if sharded else loss(input)
    if reduction != "mean":
        return total
    counted = target != ignore_index
    count = counted.sum() if weight is None else (weight[target.clamp(min=0)] * counted).sum()
    if isinstance(count, DTensor):  # one scalar all-reduce, kept for backward replicated
        with site("loss"):
            count = count.redistribute(count.device_mesh, [Replicate()] * count.device_mesh.ndim)
    return total / count.to(total.dtype)


def loss_parallel_needed(plan: Plan) -> contextlib.AbstractContextManager:
    """:func:`loss_scope` decided from the plan (before any logits exist): vocab-parallel
    when the rules shard the vocab over a mesh axis of size > 1."""
    spec = plan.rules.spec(("vocab",), where="the logits")
    sharded = any(plan.mesh.axis_size(a) > 1 for a in spec.mesh_axes)
    return loss_parallel() if sharded else contextlib.nullcontext()


def logits_of(out: object, *, name: str = "the model") -> torch.Tensor:
    """The logits in what a model returned: a tensor, or an output object with a
    ``.logits`` tensor (as Hugging Face models return); anything else is a ShardingError."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    fields = [k for k in getattr(out, "keys", lambda: [])()] if hasattr(out, "keys") else []
    extra = f" (its fields: {', '.join(fields)})" if fields else ""
    raise sl.ShardingError(
        f"{name} returned a {type(out).__name__}{extra}, not logits: a model must map token "
        "ids (batch, seq) to logits (batch, seq, vocab). Return a tensor (or an object with "
        "a .logits tensor); for a Hugging Face base model use its causal-LM class, e.g. "
        "models.hf.load(...)")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, *,
                    vocab: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over all tokens (call inside :func:`loss_scope`).

    The sum is taken locally and divided by the global token count, so the result is
    exact on any mesh. ``vocab``: the data's vocabulary, checked against the logits.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(targets.shape):
        raise sl.ShardingError(
            f"the model returned logits of shape {tuple(logits.shape)} for token ids of shape "
            f"{tuple(targets.shape)}; a model must map (batch, seq) ids to (batch, seq, vocab)"
        )
    if vocab is not None and logits.shape[-1] < vocab:
        raise sl.ShardingError(
            f"the model returned {tuple(logits.shape)} for a vocabulary of {vocab} tokens: its "
            f"last dim ({logits.shape[-1]}) must be at least the vocabulary. Does it return "
            "hidden states instead of logits (no language-model head)?")
    # (batch, vocab, seq): the class dim second, batch and seq left unflattened, so a
    # sequence-sharded tensor keeps plain Shard placements
    # in fp32 whatever the compute dtype (bf16 logits would round the loss to 8 bits)
    total = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="sum")
    return total / targets.numel()
