"""The baselines: the same model hand-parallelized with plain torch.distributed.

This is what shardlang writes for you, written the way the PyTorch tutorials do:

* dp: ``DistributedDataParallel`` (bucketed all-reduce overlapping backward);
* dp with ``--fsdp``: ``fully_shard`` (FSDP2) on every layer of the stack, then the root;
* tp: ``parallelize_module`` with a ``ColwiseParallel`` / ``RowwiseParallel`` plan (an
  embedding split over the vocabulary is ``RowwiseParallel``, a head split over it
  ``ColwiseParallel`` with its logits left sharded for ``loss_parallel``);
* dp x tp: the TP plan, then DDP (or ``fully_shard`` with ``--fsdp``) over the dp mesh.

The TP plan is read off shardlang's own plan (which linear is column- or row-parallel),
so the comparison is like for like on any model whose tensor-parallel layout is
Megatron's. Other axes (sp, ep, pp) have no hand-written baseline here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                               parallelize_module)
from torch.nn.parallel import DistributedDataParallel

import shardlang as sl
from lowering._torch import implicit_replication
from lowering.plan import Plan, layer_stack

__all__ = ["Baseline", "baseline_for", "no_baseline_reason"]


@dataclass
class Baseline:
    """One hand-parallelized model and its optimizer; :meth:`step` is one training step."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    rows: slice          # this rank's rows of the global batch
    tp: bool             # logits come out vocab-sharded (loss_parallel)

    dp_group: object = None  # averages the reported loss over dp

    def step(self, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """One step; returns this rank's loss (detached, not yet synchronised)."""
        x, y = idx[self.rows], tgt[self.rows]
        # under TP the linears return DTensors; a plain tensor the model makes itself (a
        # rotary table) meets them as a replicated one (torch's implicit_replication)
        with implicit_replication() if self.tp else contextlib.nullcontext():
            out = self.model(x)
            logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
            with loss_parallel() if self.tp else contextlib.nullcontext():
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach()

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The global batch's loss: this rank's averaged over dp, as shardlang reports it."""
        if self.dp_group is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.dp_group)
            loss /= dist.get_world_size(self.dp_group)
        return float(loss)


def no_baseline_reason(plan: Plan, model: nn.Module | None = None) -> str | None:
    """Why a layout has no hand-written baseline (None: it has one)."""
    extra = [a for a in ("pp", "sp", "ep") if plan.mesh.axis_size(a) > 1]
    if extra:
        return (f"no hand-written baseline for {'/'.join(extra)} (baselines cover DDP, "
                "fully_shard, parallelize_module TP and their combination)")
    ddp_tp = plan.mesh.dp > 1 and plan.mesh.tp > 1 and not plan.options.fsdp
    if ddp_tp and model is not None and _tied(model):
        return ("no hand-written baseline for DDP + TP on a model with tied parameters "
                f"({', '.join(_tied(model)[0])}): DDP's TP support swaps each DTensor "
                "parameter for a local one under its first name only, which unties them; "
                "use --fsdp, or a model without tied weights (gpt-bench)")
    return None


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with foreach kernels; DTensor and plain parameters in separate groups (a
    foreach kernel takes one kind; TP leaves norms and position tables plain)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [[p for p in params if isinstance(p, DTensor)],
              [p for p in params if not isinstance(p, DTensor)]]
    return torch.optim.AdamW([{"params": g} for g in groups if g], lr=lr, foreach=True)


def _tp_plan(plan: Plan, model: nn.Module) -> dict[str, object]:
    """Megatron's TP plan, read off shardlang's placements of each weight."""
    plans = {p.name: p for p in plan.params}
    aliases = dict(plan.aliases)  # a tied head: its weight is the embedding's
    out: dict[str, object] = {}
    for name, mod in model.named_modules():
        p = plans.get(f"{name}.weight") or plans.get(aliases.get(f"{name}.weight", ""))
        if p is None or "tp" not in p.spec.mesh_axes:
            continue
        dim = p.spec.dim_of("tp")
        vocab = bool(p.axes) and p.axes[0] == "vocab"
        if isinstance(mod, nn.Embedding):
            out[name] = RowwiseParallel(input_layouts=Replicate()) if dim == 0 else \
                ColwiseParallel(input_layouts=Replicate())
        elif isinstance(mod, nn.Linear) and dim == 0:
            out[name] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) \
                if vocab else ColwiseParallel(use_local_output=False)
        elif isinstance(mod, nn.Linear) and dim == 1:
            out[name] = RowwiseParallel(input_layouts=Shard(-1))
    return out


def _tied(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a head tied to the embedding)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """parallelize_module replaces each module's parameter on its own, which unties
    shared ones: point every alias at the first name's (identically placed) parameter."""
    for first, *rest in tied:
        keep = model.get_parameter(first)
        for name in rest:
            was = model.get_parameter(name)
            if getattr(was, "placements", None) != getattr(keep, "placements", None):
                raise sl.ShardingError(
                    f"the TP baseline places tied parameters {first} and {name} differently "
                    f"({getattr(keep, 'placements', 'plain')} vs "
                    f"{getattr(was, 'placements', 'plain')}); it cannot keep them one tensor")
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, keep)


def baseline_for(plan: Plan, build: Callable[[], nn.Module], *, lr: float, batch: int,
                 rank: int, device: str) -> Baseline:
    """The hand-written equivalent of ``plan`` for this rank (see the module docstring)."""
    mesh = plan.mesh
    model = build().to(device)
    dp, tp = mesh.dp, mesh.tp
    names = [a for a in ("dp", "tp") if mesh.axis_size(a) > 1]
    dmesh: DeviceMesh | None = None
    if names:
        dmesh = init_device_mesh(device, tuple(mesh.axis_size(a) for a in names),
                                 mesh_dim_names=tuple(names))
    parts = []
    if tp > 1 and dmesh is not None:
        tied = _tied(model)
        parallelize_module(model, dmesh["tp"], _tp_plan(plan, model))
        _retie(model, tied)
        parts.append("parallelize_module TP")
    if dp > 1 and dmesh is not None:
        if plan.options.fsdp:
            found = layer_stack(model)
            for layer in (found[1] if found else []):
                fully_shard(layer, mesh=dmesh["dp"])
            fully_shard(model, mesh=dmesh["dp"])
            parts.append("fully_shard (FSDP2)")
        else:
            model = DistributedDataParallel(model, device_mesh=dmesh["dp"]) if tp > 1 else \
                DistributedDataParallel(model)
            parts.append("DistributedDataParallel")
    name = " + ".join(reversed(parts)) or "one device (plain torch)"
    opt = _optimizer(model, lr)
    dp_rank = rank // tp if dp > 1 else 0
    share = batch // dp
    return Baseline(name, model, opt, slice(dp_rank * share, (dp_rank + 1) * share), tp > 1,
                    dmesh["dp"].get_group() if dp > 1 and dmesh is not None else None)
