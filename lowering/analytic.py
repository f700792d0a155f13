"""Analytic communication volume per mesh axis, from the plan alone (never from records).

Per rank, per training step, S = payload bytes; the ring formulas of
:func:`lowering.schedule.wire_bytes`:

* dp: one all-reduce of every gradient replicated over dp: 2(n-1)/n * sum(local bytes).
* FSDP: all-gather forward + all-gather backward + reduce-scatter = 3(n-1)/n * psi, psi
  the bytes of every parameter use (a tied parameter counts once per module that
  uses it), each padded up to a multiple of n along its sharded dim.
* tp (Megatron): per row-parallel linear one all-reduce of its output (b, s, out)
  forward and one of its block's input backward; a vocab-parallel embedding adds one
  forward all-reduce of (b, s, embed); a vocab-parallel head one backward all-reduce of
  its input; the vocab-parallel loss three forward all-reduces of (b*s) fp32 values
  (max, sum of exponentials, target logit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from lowering.plan import ParamPlan, Plan
from lowering.schedule import Op, wire_bytes
from lowering.tensor import Role

__all__ = ["Term", "AxisVolume", "analytic_volume"]


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


def _local_numel(p: ParamPlan, plan: Plan, *, skip: str) -> int:
    """Elements of this rank's block, counting every mesh axis but ``skip``; a dim
    sharded over ``skip`` (FSDP) is padded up to a multiple of its size."""
    n = 1
    for d, size in enumerate(p.shape):
        axes = [a for a in p.spec.axes_of(d) if a != skip]
        split = math.prod(plan.mesh.axis_size(a) for a in axes)
        size //= split
        if d == p.fsdp_dim:
            k = plan.mesh.axis_size(skip)
            size = -(-size // k) * k
        n *= size
    return n


def _uses(model: nn.Module) -> dict[str, int]:
    """How many modules hold each parameter (by its first name)."""
    first: dict[int, str] = {}
    count: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        count[key] = count.get(key, 0) + 1
    return count


def _dp(plan: Plan, model: nn.Module) -> AxisVolume | None:
    n = plan.mesh.dp
    if n == 1:
        return None
    if not plan.options.fsdp:
        vol = AxisVolume("dp", "DDP: 2(n-1)/n * sum of gradient bytes (one all-reduce each)")
        for p in plan.params:
            if "dp" not in p.spec.mesh_axes:
                vol.terms.append(Term(f"grad {p.name}", Op.ALL_REDUCE, 1,
                                      _local_numel(p, plan, skip="dp") * p.dtype.itemsize, n))
        return vol
    vol = AxisVolume("dp", "FSDP: 3(n-1)/n * psi (gather fwd, gather bwd, reduce-scatter)")
    uses = _uses(model)
    for p in plan.params:
        nbytes = _local_numel(p, plan, skip="dp") * p.dtype.itemsize
        if p.fsdp_dim is None:
            vol.terms.append(Term(f"grad {p.name} (not sharded)", Op.ALL_REDUCE, 1, nbytes, n))
            continue
        k = uses.get(p.name, 1)
        tied = f" (tied: used by {k} modules)" if k > 1 else ""
        pad = nbytes - p.nbytes // math.prod(
            plan.mesh.axis_size(a) for a in p.spec.mesh_axes if a != "dp")
        padded = f" (+{pad} B padding)" if pad else ""
        vol.terms.append(Term(f"gather {p.name}{tied}{padded}", Op.ALL_GATHER, 2 * k, nbytes, n))
        vol.terms.append(Term(f"reduce-scatter {p.name}{tied}", Op.REDUCE_SCATTER, k, nbytes, n))
    return vol


def _tp(plan: Plan, model: nn.Module, b: int, s: int) -> AxisVolume | None:
    n = plan.mesh.tp
    if n == 1:
        return None
    vol = AxisVolume("tp", "Megatron: per row-parallel linear 1 all-reduce of (b, s, out) "
                           "forward + 1 backward; embedding, head and loss terms as listed")
    itemsize = 4
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        w = getattr(mod, "weight", None)
        if w is None:
            continue
        pname = f"{name}.weight"
        plans = {p.name: p for p in plan.params}
        pp = plans.get(pname) or plans.get(dict(plan.aliases).get(pname, ""))
        if pp is None or "tp" not in pp.spec.mesh_axes:
            continue
        if isinstance(mod, nn.Linear) and pp.spec.dim_of("tp") == 1:
            payload = b * s * mod.out_features * itemsize
            vol.terms.append(Term(f"{name} (row-parallel) fwd", Op.ALL_REDUCE, 1, payload, n))
            vol.terms.append(Term(f"{name} block input bwd", Op.ALL_REDUCE, 1, payload, n))
        elif isinstance(mod, nn.Embedding) and pp.role is Role.VOCAB:
            payload = b * s * mod.embedding_dim * itemsize
            vol.terms.append(Term(f"{name} (vocab-parallel embedding) fwd", Op.ALL_REDUCE, 1,
                                  payload, n))
        elif isinstance(mod, nn.Linear) and _is_head(mod, pp):
            vol.terms.append(Term(f"{name} (vocab-parallel head) input bwd", Op.ALL_REDUCE, 1,
                                  b * s * mod.in_features * itemsize, n))
            vol.terms.append(Term("vocab-parallel loss: max, sum-exp, target logit", Op.ALL_REDUCE,
                                  3, b * s * itemsize, n))
    return vol


def _is_head(mod: nn.Linear, p: ParamPlan) -> bool:
    return p.spec.dim_of("tp") == 0 and p.axes is not None and p.axes[0] == "vocab"


def analytic_volume(plan: Plan, model: nn.Module, *, batch: int, seq: int) -> dict[str, AxisVolume]:
    """The formula volume per mesh axis for one training step on one rank."""
    b = batch // (plan.mesh.dp * plan.mesh.ep)
    s = seq // plan.mesh.sp
    out = {}
    for vol in (_dp(plan, model), _tp(plan, model, b, s)):
        if vol is not None:
            out[vol.axis] = vol
    return out
