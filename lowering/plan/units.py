"""FSDP units: which parameters one all-gather (and one reduce-scatter) moves together.

FSDP2 (``fully_shard`` on every layer, then the root) gathers a layer's parameters in one
collective, not one each: on a link whose every collective costs a fixed latency (gloo,
and NCCL at small sizes) that is most of FSDP's time. shardlang does the same for the
layers of the stack (the module marked ``layers``): each layer is one *unit*. A parameter
joins its layer's unit when

* FSDP shards it over dp on a dim no other mesh axis shards, and that dim splits evenly
  over dp (no padding: a unit's blocks are concatenated as they are);
* one module owns it (a tied parameter is gathered once for all of its owners, alone);
* it requires a gradient (a frozen one is gathered alone and never reduce-scattered).

A layer whose parameters have several dtypes is one unit per dtype (a flat buffer holds
one).

Everything else (what lies outside the stack, a model with no stack) is gathered one
parameter at a time. The wire bytes do not change, only the number of collectives, so
the analytic volumes (:mod:`.analytic`) list one term per unit with the members' bytes
summed, and the runtime (:mod:`lowering.parallel.fsdp`) gathers by the same table.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from lowering.plan.lower import Plan
from lowering.plan.pipeline import layer_stack

__all__ = ["fsdp_units"]


def fsdp_units(plan: Plan, model: nn.Module) -> dict[str, str]:
    """Parameter name -> its unit (the stack layer's path, e.g. ``model.layers.3``), for
    the parameters gathered with others; those gathered alone are absent."""
    if not plan.options.fsdp or plan.mesh.dp < 2:
        return {}
    if plan.pipeline is not None:
        stack = plan.pipeline.stack
    else:
        found = layer_stack(model)
        if found is None:
            return {}
        stack = found[0]
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
    dtypes: dict[str, set[torch.dtype]] = collections.defaultdict(set)
    for p in plan.params:
        d = p.fsdp_dim
        if d is None or not p.name.startswith(f"{stack}.") or p.name in alone:
            continue
        if p.shape[d] % n or any(plan.mesh.axis_size(a) > 1 for a in p.spec.axes_of(d)):
            continue
        out[p.name] = f"{stack}.{p.name[len(stack) + 1:].split('.')[0]}"
        dtypes[out[p.name]].add(p.dtype)
    # one flat buffer holds one dtype: a layer of several is one unit per dtype
    dtype_of = {p.name: str(p.dtype).removeprefix("torch.") for p in plan.params}
    return {name: unit if len(dtypes[unit]) == 1 else f"{unit} ({dtype_of[name]})"
            for name, unit in out.items()}
