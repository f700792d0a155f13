"""Analytic communication volume per mesh axis, from the plan alone (never from records).

Per rank, per training step, S = payload bytes, with the ring formulas of
:func:`lowering.schedule.wire_bytes`. The terms:

* gradient all-reduce over every axis that splits the tokens (dp, ep, sp; tp under
  Megatron-SP) for each parameter replicated over it: 2(n-1)/n * local bytes.
* FSDP (dp): all-gather forward + all-gather backward + reduce-scatter = 3(n-1)/n * psi,
  psi the bytes of every parameter (a tied parameter counts once: it is gathered once per
  forward however many modules use it), padded up to a multiple of n along its sharded dim.
* tp (Megatron): per row-parallel linear one all-reduce of its output (b, s, out)
  forward and one of its block's input backward; with Megatron-SP (norm_seq on tp) the
  same volume as a reduce-scatter + all-gather pair each way. A vocab-parallel
  embedding adds one forward all-reduce of (b, s, embed), a vocab-parallel head one
  backward all-reduce of its input (an all-gather + reduce-scatter under SP), the
  vocab-parallel loss three forward all-reduces of b*s fp32 values.
* sp (ring attention): per attention call n-1 permutes of the K/V block forward and
  n-1 backward, each 2 * b * (heads/tp) * (seq/n) * head_dim * 4 bytes.
* ep (MoE): per MoE layer 2 all-to-alls forward (dispatch, combine) and 2 backward of
  the layer's dispatch buffer (experts x capacity x embed).
* pp: per boundary a chunk touches, m sends (or receives) of this rank's block of one
  microbatch's hidden state each way; and one all-reduce of every parameter held by
  every stage (embeddings, final norm, head). Under pp every activation term above is
  per microbatch (b/m rows, m times) and counts only this stage's layers; the head and
  loss terms belong to the last stage.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lowering.plan.buckets import grad_buckets, head_local_params, local_numel
from lowering.plan.lower import ParamPlan, PipelinePlan, Plan
from lowering.plan.roles import Role
from lowering.plan.units import fsdp_units
from lowering.schedule.records import Op, Record, wire_bytes

__all__ = ["Term", "AxisVolume", "analytic_volume", "unexplained"]

_F32 = 4


def _act(plan: Plan) -> int:
    """Bytes per activation element on the wire: bf16 compute moves 2, fp32 4."""
    precision = plan.options.precision
    return 2 if str(getattr(precision, "value", precision)) == "bf16" else _F32


@dataclass(frozen=True)
class Term:
    what: str
    op: Op
    count: int
    payload: int  # bytes of one collective
    n: int

    @property
    def bytes(self) -> int:
        return self.count * self.payload

    @property
    def wire_bytes(self) -> float:
        return self.count * wire_bytes(self.op, self.payload, self.n)


@dataclass
class AxisVolume:
    axis: str
    formula: str
    terms: list[Term] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def wire_bytes(self) -> float:
        return sum(t.wire_bytes for t in self.terms)

    def json(self) -> dict[str, object]:
        return {
            "formula": self.formula, "bytes": self.bytes, "wire_bytes": self.wire_bytes,
            "terms": [{"what": t.what, "op": t.op.value, "count": t.count,
                       "payload": t.payload, "bytes": t.bytes, "wire_bytes": t.wire_bytes}
                      for t in self.terms],
        }


def _entry_axes(plan: Plan, logical: str) -> set[str]:
    e = plan.rules.mesh_entry(logical)
    axes = (e,) if isinstance(e, str) else (e or ())
    return {a for a in axes if plan.mesh.axis_size(a) > 1}


def _local_numel(p: ParamPlan, plan: Plan, *, gathered: bool) -> int:
    return local_numel(p, plan, gathered=gathered)


def _uses(model: nn.Module) -> dict[str, int]:
    first: dict[int, str] = {}
    count: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        count[key] = count.get(key, 0) + 1
    return count


def _grad_sync(plan: Plan, model: nn.Module, axis: str, why: str, *,
               gathered: bool = False) -> list[Term]:
    """One all-reduce per parameter (under FSDP in the gather's backward, once per
    forward, tied parameters included; ``gathered``: of the gathered gradient, as a
    shard_map region reduces it before FSDP's reduce-scatter)."""
    n = plan.mesh.axis_size(axis)
    return [Term(f"grad {p.name} ({why})", Op.ALL_REDUCE, 1,
                 _local_numel(p, plan, gathered=gathered) * p.dtype.itemsize, n)
            for p in plan.params
            if axis not in p.spec.mesh_axes and not (axis == "dp" and p.fsdp_dim is not None)]


def _fsdp(plan: Plan, model: nn.Module) -> list[Term]:
    """Per parameter gathered alone, and per unit (a layer of the stack, :mod:`.units`):
    two all-gathers (forward, before backward) and one reduce-scatter."""
    n, uses, terms = plan.mesh.dp, _uses(model), []
    units = fsdp_units(plan, model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    grouped: dict[str, list[tuple[int, int]]] = {}
    for p in plan.params:
        if p.fsdp_dim is None:
            continue
        nbytes = _local_numel(p, plan, gathered=True) * p.dtype.itemsize
        # gathered in the compute dtype (bf16: half), reduce-scattered in the parameter's
        moved = (nbytes // p.dtype.itemsize * 2 if _act(plan) == 2 and p.dtype.is_floating_point
                 else nbytes)
        if p.name in units:
            grouped.setdefault(units[p.name], []).append((moved, nbytes))
            continue
        tied = f" (tied: gathered once for its {uses[p.name]} modules)" \
            if uses.get(p.name, 1) > 1 else ""
        pad = nbytes - p.nbytes // math.prod(
            plan.mesh.axis_size(a) for a in p.spec.mesh_axes if a != "dp")
        padded = f" (+{pad} B padding)" if pad else ""
        if p.name in frozen:  # no gradient to reduce-scatter; gathered again before its
            # module's backward (where a gradient flows through it, as under a trainable layer)
            terms.append(Term(f"gather {p.name} (frozen){padded}", Op.ALL_GATHER, 2, moved, n))
            continue
        terms.append(Term(f"gather {p.name}{tied}{padded}", Op.ALL_GATHER, 2, moved, n))
        terms.append(Term(f"reduce-scatter {p.name}{tied}", Op.REDUCE_SCATTER, 1, nbytes, n))
    for unit, sizes in grouped.items():
        what = f"{unit} (one unit: {len(sizes)} parameters)"
        terms.append(Term(f"gather {what}", Op.ALL_GATHER, 2, sum(m for m, _ in sizes), n))
        terms.append(Term(f"reduce-scatter {what}", Op.REDUCE_SCATTER, 1,
                          sum(b for _, b in sizes), n))
    return terms


def _pair(what: str, payload: int, n: int, sp: bool, fwd_gather: bool) -> list[Term]:
    """One Megatron conversion each way: an all-reduce, or under SP the gather/scatter."""
    if not sp:
        return [Term(what, Op.ALL_REDUCE, 1, payload, n)]
    first, second = (Op.ALL_GATHER, Op.REDUCE_SCATTER) if fwd_gather else (
        Op.REDUCE_SCATTER, Op.ALL_GATHER)
    return [Term(f"{what} fwd", first, 1, payload, n), Term(f"{what} bwd", second, 1, payload, n)]


def _tp(plan: Plan, model: nn.Module, b: int, s: int, *, bucketed: bool) -> list[Term]:
    n = plan.mesh.tp
    sp = "tp" in _entry_axes(plan, "norm_seq")
    plans = {p.name: p for p in plan.params}
    aliases = dict(plan.aliases)
    terms: list[Term] = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        pp = plans.get(f"{name}.weight") or plans.get(aliases.get(f"{name}.weight", ""))
        if w is None or pp is None or "tp" not in pp.spec.mesh_axes:
            continue
        if isinstance(mod, nn.Linear) and pp.spec.dim_of("tp") == 1:
            payload = b * s * mod.out_features * _act(plan)
            if sp:
                terms += _pair(f"{name} (row-parallel) output", payload, n, True, False)
                terms += _pair(f"{name} block input", payload, n, True, True)
            else:
                terms.append(Term(f"{name} (row-parallel) output fwd", Op.ALL_REDUCE, 1, payload, n))
                terms.append(Term(f"{name} block input bwd", Op.ALL_REDUCE, 1, payload, n))
        elif isinstance(mod, nn.Embedding) and pp.role is Role.VOCAB:
            terms.append(Term(f"{name} (vocab-parallel embedding) fwd", Op.ALL_REDUCE, 1,
                              b * s * mod.embedding_dim * _act(plan), n))
        elif (isinstance(mod, nn.Linear) and pp.spec.dim_of("tp") == 0 and pp.axes
              and pp.axes[0] == "vocab"):
            terms += _pair(f"{name} (vocab-parallel head) input", b * s * mod.in_features * _act(plan),
                           n, sp, True) if sp else [
                Term(f"{name} (vocab-parallel head) input bwd", Op.ALL_REDUCE, 1,
                     b * s * mod.in_features * _act(plan), n)]
            terms.append(Term("vocab-parallel loss: max, sum-exp, target logit", Op.ALL_REDUCE,
                              3, b * s * _F32, n))
    if not bucketed:
        terms += _head_local(plan, model, n)
        if sp:
            terms += _grad_sync(plan, model, "tp", "Megatron-SP: tokens split over tp")
    elif sp:
        terms += _unbucketed(plan, model, "tp", "Megatron-SP: tokens split over tp")
    return terms


def _head_local(plan: Plan, model: nn.Module, n: int) -> list[Term]:
    """A replicated weight that acts on each head's own width (a q/k norm of width
    head_dim beside column-parallel q/k projections) sees only this rank's heads: its
    gradient is partial over tp, one all-reduce backward."""
    shapes = dict(model.named_parameters())
    return [Term(f"grad {name} (acts on this rank's heads)", Op.ALL_REDUCE, 1,
                 shapes[name].numel() * _F32, n) for name in head_local_params(plan, model)]


def _buckets(plan: Plan, model: nn.Module, axis: str) -> list[Term]:
    """Bucketed gradient all-reduces over ``axis`` (:mod:`lowering.plan.buckets`)."""
    n = plan.mesh.axis_size(axis)
    return [Term(f"grad bucket {b.index}: {len(b.names)} parameters ({b.site})",
                 Op.ALL_REDUCE, 1, b.nbytes, n)
            for b in grad_buckets(plan, model) if axis in b.axes]


def _unbucketed(plan: Plan, model: nn.Module, axis: str, why: str) -> list[Term]:
    """Gradients reduced where a shard_map region runs (not bucketed)."""
    return [t for t in _grad_sync(plan, model, axis, why, gathered=True)
            if t.what.split()[1].rpartition(".")[0] in plan.trace.shard_map_modules]


def _sp(plan: Plan, b_shards: int) -> list[Term]:
    n = plan.mesh.sp
    terms = []
    for i, (B, H, S, D) in enumerate(plan.trace.attention):
        payload = 2 * (B // b_shards) * (H // plan.mesh.tp) * (S // n) * D * _act(plan)
        terms.append(Term(f"attention {i}: K/V ring fwd", Op.PERMUTE, n - 1, payload, n))
        terms.append(Term(f"attention {i}: K/V ring bwd", Op.PERMUTE, n - 1, payload, n))
    return terms


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that say how much their expert dispatch moves (``all_to_all_payload``)."""
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "all_to_all_payload", None))]


def _ep(plan: Plan, model: nn.Module, tokens: int) -> list[Term]:
    terms = []
    for name, mod in _moe_layers(model):
        payload = int(mod.all_to_all_payload(tokens))  # type: ignore[operator]
        terms.append(Term(f"{name}: dispatch + combine fwd", Op.ALL_TO_ALL, 2, payload,
                          plan.mesh.ep))
        terms.append(Term(f"{name}: dispatch + combine bwd", Op.ALL_TO_ALL, 2, payload,
                          plan.mesh.ep))
    return terms


def _moe_extra(plan: Plan, model: nn.Module, axis: str, tokens: int, token_axes: set[str]) -> list[Term]:
    """Routing statistics (one psum per token axis) and, with experts split over tp, the
    row-parallel psum of each expert's output forward and its input's cotangent backward."""
    n, terms = plan.mesh.axis_size(axis), []
    for name, mod in _moe_layers(model):
        stats = getattr(mod, "statistics_payload", None)
        if axis in token_axes and callable(stats):
            terms.append(Term(f"{name}: routing statistics", Op.ALL_REDUCE, 1, int(stats()), n))
        if axis == "tp" and any(mesh_axis == "tp" for p in plan.params
                                if p.name.startswith(f"{name}.") for mesh_axis in p.spec.mesh_axes):
            payload = int(mod.all_to_all_payload(tokens))  # type: ignore[operator]
            terms.append(Term(f"{name}: experts' row-parallel output fwd", Op.ALL_REDUCE, 1, payload, n))
            terms.append(Term(f"{name}: experts' input bwd", Op.ALL_REDUCE, 1, payload, n))
    return terms


_FORMULAS = {
    "dp": "gradient all-reduce 2(n-1)/n per bucket of replicated parameters; FSDP 3(n-1)/n * psi",
    "ep": "MoE dispatch + combine all-to-alls (n-1)/n each way; dense gradient all-reduce",
    "sp": "ring attention: n-1 K/V permutes each way per attention; gradient all-reduce",
    "tp": "Megatron: 2 all-reduces (or AG+RS under SP) per row-parallel linear; "
          "embedding, head and loss terms",
}


def analytic_volume(plan: Plan, model: nn.Module, *, batch: int, seq: int,
                    pp_rank: int = 0, bucketed: bool = True) -> dict[str, AxisVolume]:
    """The formula volume per mesh axis for one training step on one rank (of pipeline
    stage ``pp_rank``; ``model`` is then that stage's model). Gradients are bucketed
    unless pipelined (``bucketed=False``: one all-reduce per parameter, as a pipeline's
    stages reduce them)."""
    if plan.pipeline is not None:
        return _pipelined(plan, plan.pipeline, model, batch=batch, seq=seq, pp_rank=pp_rank)
    mesh = plan.mesh
    bucketed = bucketed and plan.options.bucket_kb != 0
    batch_axes, seq_axes = _entry_axes(plan, "batch"), _entry_axes(plan, "seq")
    b_shards = math.prod(mesh.axis_size(a) for a in batch_axes)
    b, s = batch // b_shards, seq // math.prod(mesh.axis_size(a) for a in seq_axes)
    out: dict[str, AxisVolume] = {}
    for axis in ("dp", "ep", "sp", "tp"):
        if mesh.axis_size(axis) == 1:
            continue
        vol = AxisVolume(axis, _FORMULAS[axis])
        splits_tokens = axis in batch_axes or axis in seq_axes
        if axis == "dp" and plan.options.fsdp:
            vol.terms += _fsdp(plan, model)
        if bucketed:
            vol.terms += _buckets(plan, model, axis)
            if splits_tokens:
                vol.terms += _unbucketed(plan, model, axis, "tokens split over " + axis)
        elif splits_tokens:
            vol.terms += _grad_sync(plan, model, axis, "tokens split over " + axis)
        if axis == "tp":
            vol.terms += _tp(plan, model, b, s, bucketed=bucketed)
        if axis == "sp":
            vol.terms += _sp(plan, b_shards)
        if axis == "ep":
            vol.terms += _ep(plan, model, b * s)
        vol.terms += _moe_extra(plan, model, axis, b * s, batch_axes | seq_axes)
        out[axis] = vol
    return out


def _pipelined(plan: Plan, pl: PipelinePlan, model: nn.Module, *, batch: int, seq: int,
               pp_rank: int) -> dict[str, AxisVolume]:
    """The terms of one pipeline stage: its parameters, its layers, per microbatch."""
    pipe = pl.pipe
    m, held = pipe.microbatches, {n for n, _ in model.named_parameters(remove_duplicate=False)}
    chunks = pipe.chunks_of(pp_rank)
    layers = sum(len(pipe.layers_of(c, pl.n_layers)) for c in chunks)
    attn = tuple((b // m, *rest) for b, *rest in
                 plan.trace.attention[:len(plan.trace.attention) * layers // max(pl.n_layers, 1)])
    first, last = 0 in chunks, pipe.chunks - 1 in chunks

    def has_grad(name: str) -> bool:  # outside the stack: only where it is used
        return (pl.in_stack(name) or (first and name in pl.pre)
                or (last and name in pl.post))
    stage = dataclasses.replace(plan, pipeline=None, params=tuple(p for p in plan.params
                                                             if p.name in held),
                                trace=dataclasses.replace(plan.trace, attention=attn))
    synced = dataclasses.replace(stage, params=tuple(p for p in stage.params if has_grad(p.name)))
    out = analytic_volume(stage, model, batch=batch // m, seq=seq, bucketed=False)
    grads = {t.what for v in analytic_volume(synced, model, batch=batch // m, seq=seq,
                                             bucketed=False).values()
             for t in v.terms if t.what.startswith("grad ")}
    # FSDP and shard_map regions (MoE experts) reduce each use's gradient as it happens,
    # so once per microbatch; every other gradient once per step
    each = {p.name for p in plan.params if p.fsdp_dim is not None
            or p.name.rpartition(".")[0] in plan.trace.shard_map_modules}

    pre_modules = {n.rpartition(".")[0] for n in pl.pre}

    def per_microbatch(t: Term) -> bool:
        return not t.what.startswith("grad ") or t.what.split()[1] in each
    for vol in out.values():
        vol.terms = [dataclasses.replace(t, count=t.count * m) if per_microbatch(t) else t
                     for t in vol.terms
                     if (t.what in grads if t.what.startswith("grad ") else
                         last or not ("vocab-parallel head" in t.what or "loss" in t.what))]
        vol.terms = [_fsdp_outside_stack(t, plan, pl, first=first, last=last, m=m,
                                         chunks=len(chunks)) for t in vol.terms]
        # what precedes the stack runs once per chunk forward (v chunks when interleaved)
        vol.terms = [dataclasses.replace(t, count=t.count * len(chunks))
                     if t.what.split(" ")[0] in pre_modules and "fwd" in t.what else t
                     for t in vol.terms]
        vol.terms = [t for t in vol.terms if t.count]
    out["pp"] = AxisVolume("pp", "b*s*h per microbatch per boundary each way; shared "
                                 "parameters' gradient all-reduce")
    shape, dtype = pl.hidden or ((0,), None)
    block = math.prod(shape) // m * (dtype.itemsize if dtype else 4)
    for a in ("batch", "norm_seq", "embed"):
        block //= math.prod(plan.mesh.axis_size(x) for x in _entry_axes(plan, a))
    for c in chunks:
        for peer, ops in ((c - 1, (Op.RECV, Op.SEND)), (c + 1, (Op.SEND, Op.RECV))):
            if 0 <= peer <= pipe.chunks - 1:
                out["pp"].terms += [Term(f"boundary {min(c, peer)}->{max(c, peer)} "
                                         f"{'activations' if i == 0 else 'gradients'}",
                                         op, m, block, pipe.pp) for i, op in enumerate(ops)]
    out["pp"].terms += [Term(f"grad {p.name} (every stage holds it)", Op.ALL_REDUCE, 1,
                             _local_numel(p, plan, gathered=False) * p.dtype.itemsize, pipe.pp)
                        for p in stage.params if not pl.in_stack(p.name)]
    return out


def _fsdp_outside_stack(t: Term, plan: Plan, pl: PipelinePlan, *, first: bool, last: bool,
                        m: int, chunks: int) -> Term:
    """An FSDP parameter outside the layer stack is gathered wherever a module using it
    runs (what precedes the stack runs on every stage) but re-gathered and reduced only
    where its gradient flows (before the stack: the first stage; after it: the last)."""
    kind, _, rest = t.what.partition(" ")
    name = rest.split(" ")[0]
    p = next((q for q in plan.params if q.name == name), None)
    if (p is None or p.fsdp_dim is None or pl.in_stack(name)
            or kind not in ("gather", "reduce-scatter", "grad")):
        return t
    pre, post = name in pl.pre, name in pl.post
    fwd = pre * chunks + (last and post and not pre)  # one gather serves both uses
    bwd = (first and pre) + (last and post)
    count = {"gather": fwd + bwd, "reduce-scatter": bwd, "grad": bwd}[kind] * m
    return dataclasses.replace(t, count=count)


def unexplained(records: Sequence[Record], volumes: dict[str, AxisVolume]) -> list[Record]:
    """Recorded collectives that no formula term accounts for (matched by axis, op and
    payload), so a difference between recorded and analytic totals is never silent."""
    budget: collections.Counter[tuple[str, Op, int]] = collections.Counter()
    for axis, vol in volumes.items():
        for t in vol.terms:
            budget[(axis, t.op, t.payload)] += t.count
    left = []
    for r in records:
        key = (r.axis, r.op, r.bytes)
        if budget[key] > 0:
            budget[key] -= 1
        else:
            left.append(r)
    return left
