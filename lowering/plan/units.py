"""FSDP units: which parameters one all-gather (and one reduce-scatter) moves together.

FSDP2 (``fully_shard`` on every layer, then the root) gathers a layer's parameters in one
collective, not one each: on a link whose every collective costs a fixed latency (gloo,
and NCCL at small sizes) that is most of FSDP's time. shardlang does the same: each
layer of the stack (the module marked ``layers``) is one *unit*, and outside the stack
(or in a model that marks none) each module's own parameters are one (a linear's weight
and bias; not under a pipeline, whose stages use what lies outside the stack each in
its own way, nor the root module's own). A parameter joins a unit when

* FSDP shards it over dp on a dim no other mesh axis shards, and that dim splits evenly
  over dp (no padding: a unit's blocks are concatenated as they are);
* one module owns it (a tied parameter is gathered once for all of its owners, alone);
* it requires a gradient (a frozen one is gathered alone and never reduce-scattered).

A unit has two members at least, and one dtype (a layer of several is one unit per
dtype: a flat buffer holds one). Everything else is gathered one parameter at a time.
The wire bytes do not change, only the number of collectives, so the analytic volumes
(:mod:`.analytic`) list one term per unit with the members' bytes summed, and the
runtime (:mod:`lowering.parallel.fsdp`) gathers by the same table.
"""

from __future__ import annotations

import collections

from torch import nn

from lowering.plan.lower import Plan
from lowering.plan.pipeline import layer_stack

__all__ = ["fsdp_units"]


def fsdp_units(plan: Plan, model: nn.Module) -> dict[str, str]:
    """Parameter name -> its unit (a stack layer's path, e.g. ``model.layers.3``, or a
    module's), for the parameters gathered with others; those gathered alone are absent."""
    if not plan.options.fsdp or plan.mesh.dp < 2:
        return {}
    if plan.pipeline is not None:
        stack: str | None = plan.pipeline.stack
    else:
        found = layer_stack(model)
        stack = found[0] if found is not None else None
    owners: dict[int, int] = {}
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
        names.setdefault(id(p), name)
    aliases = dict(plan.aliases)
    alone = {names[k] for k, n in owners.items() if n > 1}  # tied
    alone |= {n for n, p in model.named_parameters() if not p.requires_grad}  # frozen
    alone |= {aliases.get(n, n) for n in alone}
    n = plan.mesh.dp
    out: dict[str, str] = {}
    for p in plan.params:
        d = p.fsdp_dim
        if d is None or p.name in alone or p.shape[d] % n or any(
                plan.mesh.axis_size(a) > 1 for a in p.spec.axes_of(d)):
            continue
        owner = p.name.rpartition(".")[0]
        if stack is not None and p.name.startswith(f"{stack}."):
            out[p.name] = f"{stack}.{p.name[len(stack) + 1:].split('.')[0]}"
        elif plan.mesh.pp == 1 and owner:  # (a stage's plan has no pipeline, its mesh pp)
            out[p.name] = owner
    dtype_of = {p.name: str(p.dtype).removeprefix("torch.") for p in plan.params}
    dtypes: dict[str, set[str]] = collections.defaultdict(set)
    for name, unit in out.items():
        dtypes[unit].add(dtype_of[name])
    # one flat buffer holds one dtype: a layer of several is one unit per dtype
    out = {name: unit if len(dtypes[unit]) == 1 else f"{unit} ({dtype_of[name]})"
           for name, unit in out.items()}
    size = collections.Counter(out.values())
    return {name: unit for name, unit in out.items() if size[unit] > 1}
