"""Gradient buckets, pure data: which gradients are all-reduced together, over which axes.

A parameter replicated over an axis that splits the tokens (dp, ep, sp; tp under
Megatron-SP; tp for a weight acting on one rank's heads) gets a gradient that is partial
over that axis. Reducing each gradient on its own costs one collective per parameter;
DDP's answer, and ours, is buckets: the flattened gradients of several parameters in one
all-reduce per axis, issued as soon as the last of them is ready, while the rest of the
backward still runs.

Buckets follow the parameters in reverse registration order (roughly the order backward
produces them), grouped by the axes they reduce over and their dtype, and close at
:data:`FIRST_BUCKET_BYTES` for the first bucket (so communication starts early) and
:data:`BUCKET_BYTES` after that: DDP's defaults. The same function feeds the runtime
(``lowering.parallel.data``) and the analytic volumes, so the printed schedule and the
formula agree bucket by bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowering.plan.lower import Plan
from lowering.plan.roles import Role

__all__ = ["GradBucket", "grad_buckets", "grad_reduce_axes", "FIRST_BUCKET_BYTES",
           "BUCKET_BYTES", "token_axes", "local_numel"]

FIRST_BUCKET_BYTES = 1 << 20   # DDP's first bucket: communication starts early in backward
BUCKET_BYTES = 25 << 20        # DDP's bucket_cap_mb=25


@dataclass(frozen=True)
class GradBucket:
    """Gradients all-reduced together: one flat all-reduce per axis in ``axes``."""

    index: int
    names: tuple[str, ...]   # parameters, in the order their gradients are packed
    axes: tuple[str, ...]    # mesh axes reduced over (in mesh order)
    nbytes: int              # this rank's payload (rank 0's block sizes)

    @property
    def site(self) -> str:
        """Where the schedule attributes the bucket's collectives."""
        if len(self.names) == 1:
            return self.names[0]
        return f"grads {self.names[0]} .. {self.names[-1]}"


def token_axes(plan: Plan, logical: str) -> set[str]:
    """The mesh axes (of size > 1) a logical axis is split over."""
    e = plan.rules.mesh_entry(logical)
    axes = (e,) if isinstance(e, str) else (e or ())
    return {a for a in axes if plan.mesh.axis_size(a) > 1}


def local_numel(p, plan: Plan, *, gathered: bool) -> int:  # noqa: ANN001 - a ParamPlan
    """Elements of rank 0's block of ``p``. ``gathered``: as FSDP's all-gather produces it
    (dp gathered, its dim padded up to a multiple of dp); else as stored."""
    n = 1
    for d, size in enumerate(p.shape):
        ways = 1
        for a in p.spec.axes_of(d):
            ways *= plan.mesh.axis_size(a)
        size //= ways
        if d == p.fsdp_dim:
            k = plan.mesh.dp
            size = -(-size // k) * k if gathered else -(-size // k)
        n *= size
    return n


def head_local_params(plan: Plan, model: nn.Module) -> list[str]:
    """Replicated weights acting on each head's own width (a q/k norm of width head_dim
    beside column-parallel q/k projections): they see only this rank's heads, so their
    gradient is partial over tp."""
    plans = {p.name: p for p in plan.params}
    out = []
    for name, block in model.named_modules():
        kids = dict(block.named_children())
        widths = {m.in_features for k, m in kids.items() if isinstance(m, nn.Linear)
                  and (pp := plans.get(f"{name}.{k}.weight" if name else f"{k}.weight"))
                  and pp.role is Role.COLUMN and "tp" in pp.spec.mesh_axes}
        if not widths:
            continue
        for k, m in kids.items():
            w = getattr(m, "weight", None)
            pp = plans.get(f"{name}.{k}.weight" if name else f"{k}.weight")
            if (isinstance(m, (nn.Linear, nn.Embedding)) or w is None or pp is None
                    or "tp" in pp.spec.mesh_axes or w.shape[-1] in widths):
                continue
            prefix = f"{name}.{k}" if name else k
            out += [f"{prefix}.{n}" for n, q in m.named_parameters(recurse=False)
                    if q.requires_grad]
    return out


def grad_reduce_axes(plan: Plan, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the mesh axes its gradient is all-reduced over after backward
    (FSDP's reduce-scatter over dp happens in the gather's backward, not here)."""
    axes = token_axes(plan, "batch") | token_axes(plan, "seq")
    if "tp" in token_axes(plan, "norm_seq"):
        axes.add("tp")
    axes.discard("pp")
    heads = set(head_local_params(plan, model)) if plan.mesh.tp > 1 else set()
    out: dict[str, tuple[str, ...]] = {}
    for p in plan.params:
        mine = tuple(a for a in ("dp", "ep", "sp", "tp")
                     if ((a in axes) or (a == "tp" and p.name in heads))
                     and a not in p.spec.mesh_axes
                     and not (a == "dp" and p.fsdp_dim is not None))
        if mine:
            out[p.name] = mine
    return out


def grad_buckets(plan: Plan, model: nn.Module) -> list[GradBucket]:
    """The gradient buckets of a non-pipelined plan (a pipeline's stages reduce each
    gradient once after the step's last backward instead), sized by
    ``plan.options.bucket_kb`` (None: DDP's defaults; 0: no buckets). Parameters inside
    a shard_map region (MoE experts' neighbours) reduce where the region runs; they get
    no bucket."""
    kb = plan.options.bucket_kb
    if kb == 0:
        return []
    first_bytes, cap_bytes = (FIRST_BUCKET_BYTES, BUCKET_BYTES) if kb is None else (
        kb << 10, kb << 10)
    reduce = grad_reduce_axes(plan, model)
    open_: dict[tuple, tuple[list[str], int]] = {}
    done: list[tuple[tuple[str, ...], tuple[str, ...], int]] = []
    for p in reversed(plan.params):
        axes = reduce.get(p.name)
        if not axes or p.name.rpartition(".")[0] in plan.trace.shard_map_modules:
            continue
        key = (axes, p.dtype)
        names, size = open_.get(key, ([], 0))
        nbytes = local_numel(p, plan, gathered=False) * p.dtype.itemsize
        names, size = names + [p.name], size + nbytes
        cap = first_bytes if not done else cap_bytes
        if size >= cap:
            done.append((tuple(names), axes, size))
            open_.pop(key, None)
        else:
            open_[key] = (names, size)
    for (axes, _), (names, size) in open_.items():
        done.append((tuple(names), axes, size))
    return [GradBucket(i, names, axes, size) for i, (names, axes, size) in enumerate(done)]
