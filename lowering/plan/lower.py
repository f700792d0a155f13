"""``lower(model, mesh, rules)``: the static plan, pure data.

For every parameter: its logical axes, spec, DTensor placements and tensor-parallel
role; plus the mesh, rules and options, and under ``pp`` the pipeline (one
:class:`PipelinePlan`). The collective schedule is recorded from this plan by dry,
simulate or run mode (:mod:`lowering.run.modes`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import Placement

import shardlang as sl
from shardlang.annotate import tensor_split_refusal
from lowering.plan.options import Options, Schedule, check_options
from lowering.plan.pipeline import Pipe, check_pipe, hidden_key, layer_stack
from lowering.plan.placements import fsdp_dim, placements, tensor_axes
from lowering.plan.roles import Role, tp_role
from lowering.plan.shapes import ShapeTrace, check_activations

__all__ = ["ParamPlan", "PipelinePlan", "Plan", "lower"]


@dataclass(frozen=True)
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axes: sl.Axes | None
    spec: sl.P
    placements: tuple[Placement, ...]
    role: Role
    fsdp_dim: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PipelinePlan:
    """The pipeline of a plan with ``pp > 1``: its schedule shape and what the meta trace
    saw of the model around its layer stack."""

    pipe: Pipe
    stack: str                        # path of the module marked 'layers'
    n_layers: int
    hidden: tuple[tuple[int, ...], torch.dtype] | None  # stack input: global shape, dtype
    layer_tuple: bool                 # the layers return a tuple (hidden state first)
    pre: frozenset[str]               # parameters used before the stack (first stage)
    post: frozenset[str]              # ... and after it (last stage)

    def in_stack(self, name: str) -> bool:
        """A parameter of the layer stack (held by one pipeline rank)."""
        return name.startswith(f"{self.stack}.")

    def stage_of(self, name: str) -> int | None:
        """The pipeline rank holding a parameter of the stack; None outside it (every
        pipeline rank holds those)."""
        if not self.in_stack(name):
            return None
        layer = int(name[len(self.stack) + 1:].split(".")[0])
        return self.pipe.rank_of(self.pipe.chunk_of(layer, self.n_layers))


@dataclass(frozen=True)
class Plan:
    mesh: sl.Mesh
    rules: sl.Rules
    options: Options
    params: tuple[ParamPlan, ...]
    aliases: tuple[tuple[str, str], ...]  # (tied name, name it shares storage with)
    trace: ShapeTrace = ShapeTrace()      # what the meta shape check saw (needs batch, seq)
    pipeline: PipelinePlan | None = None  # pp > 1

    @property
    def pipe(self) -> Pipe | None:
        """The pipeline's schedule shape (None without pp)."""
        return self.pipeline.pipe if self.pipeline else None

    @property
    def batch_ways(self) -> int:
        """Into how many shards the batch dim splits (dp, and ep by default)."""
        spec = self.rules.spec(("batch",), where="the input batch")
        return math.prod(self.mesh.axis_size(a) for a in spec.mesh_axes)

    @property
    def axes(self) -> tuple[str, ...]:
        return tensor_axes(self.mesh)

    def param(self, name: str) -> ParamPlan:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def n_params(self) -> int:
        return sum(math.prod(p.shape) for p in self.params)


def _used_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for p in model.parameters():
        out.update(a for a in (sl.logical_axes(p) or ()) if a)
    return out


def lower(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules, *, options: Options | None = None,
          extra_names: Iterable[str] = (), **keywords: object) -> Plan:
    """Validate a layout and derive every parameter's placements.

    ``keywords`` are the fields of :class:`lowering.Options` (``fsdp``, ``batch``, ``seq``,
    ``load_balance``, ``schedule``, ``microbatches``, ``virtual``), or pass ``options``.
    With ``batch`` and ``seq`` the model also runs once on meta tensors, so activation
    shapes are checked too. Every mistake is a :class:`shardlang.ShardingError`.

    Example:
        >>> import shardlang as sl, lowering, models
        >>> plan = lowering.lower(models.PRESETS["gpt-tiny"].factory(),
        ...                       sl.Mesh(dp=2, tp=2), sl.Rules.default())
        >>> plan.param("blocks.0.mlp.up.weight").spec
        P('tp', None)
    """
    if not isinstance(mesh, sl.Mesh):
        raise sl.ShardingError(f"lower() takes an sl.Mesh, got {type(mesh).__name__}")
    if not isinstance(rules, sl.Rules):
        raise sl.ShardingError(f"lower() takes sl.Rules, got {type(rules).__name__}")
    if options is not None and keywords:
        raise sl.ShardingError("lower() takes options=Options(...) or option keywords, not both")
    options = options if options is not None else Options.of(**keywords)
    check_options(options, mesh, rules)
    refused = tensor_split_refusal(model)
    if refused is not None and mesh.tp > 1:
        raise sl.ShardingError(refused)
    pipeline_of = _pipeline(model, mesh, rules, options)
    trace = ShapeTrace()
    around = _Around(model, pipeline_of[1]) if pipeline_of else None
    if options.batch is not None and options.seq is not None:
        with around or contextlib.nullcontext():
            trace = check_activations(model, mesh, rules, batch=options.batch, seq=options.seq)
    rules.check_names(_used_names(model) | set(extra_names) | trace.names)
    params, aliases = _param_plans(model, mesh, rules, options, trace)
    if trace.ran:
        _warn_unused_axes(model, mesh, rules, params, trace)
    pipeline = None
    if pipeline_of is not None and around is not None:
        pipe, stack, n_layers = pipeline_of
        pipeline = PipelinePlan(pipe=pipe, stack=stack, n_layers=n_layers, hidden=around.hidden,
                                layer_tuple=around.tuple_out,
                                pre=frozenset(around.names("pre", aliases)),
                                post=frozenset(around.names("post", aliases)))
    return Plan(mesh=mesh, rules=rules, options=options, params=params,
                aliases=tuple(aliases), trace=trace, pipeline=pipeline)


def _param_plans(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules, options: Options,
                 trace: ShapeTrace) -> tuple[tuple[ParamPlan, ...], list[tuple[str, str]]]:
    modules = dict(model.named_modules())
    first: dict[int, str] = {}
    plans: list[ParamPlan] = []
    aliases: list[tuple[str, str]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.append((name, first[id(p)]))
            continue
        first[id(p)] = name
        axes = sl.logical_axes(p)
        spec = rules.spec(axes, where=name) if axes else sl.P(*([None] * p.dim()))
        sl.rules.check_divisible(p.shape, axes or (), spec, mesh, where=name)
        owner_name = name.rpartition(".")[0]
        # (a module that runs a shard_map, MoE experts, is sharded too: the region takes
        # the gathered parameter as varying over dp, so its gradient leaves as a partial
        # sum for the gather's reduce-scatter)
        fdim = fsdp_dim(spec, p.shape, mesh) if options.fsdp and mesh.dp > 1 else None
        plans.append(ParamPlan(
            name=name, shape=tuple(p.shape), dtype=p.dtype, axes=axes, spec=spec,
            placements=placements(spec, mesh, fsdp=fdim),
            role=tp_role(modules[owner_name], spec, p.dim(), mesh), fsdp_dim=fdim,
        ))
    return tuple(plans), aliases


def _warn_unused_axes(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules,
                      params: tuple[ParamPlan, ...], trace: ShapeTrace) -> None:
    """A mesh axis that shards nothing (no parameter, no activation, not the input's
    batch or sequence) only repeats the same work on every rank: say so."""
    used: set[str] = set()
    for p in params:
        used.update(p.spec.mesh_axes)
    for name in trace.names | {"batch", "seq"}:
        used.update(rules.spec((name,), where=name).mesh_axes)
    idle = [a for a in mesh.shape if a != "pp" and a not in used]
    if not idle:
        return
    mapped = {a: sorted(n for n, e in rules.table if a in ((e,) if isinstance(e, str) else e or ()))
              for a in idle}
    axes = ", ".join(f"{a} (rules map {', '.join(mapped[a]) or 'no logical axis'} to it)"
                     for a in idle)
    warnings.warn(sl.ShardingWarning(
        f"nothing in {type(model).__name__} is sharded over {axes}: no parameter or "
        "activation carries a logical axis that maps there, so every rank of that axis "
        "repeats the same work. Annotate parameters with sl.axes(...) or "
        "sl.annotate(model, {...}), or drop the axis from the mesh"), stacklevel=3)


class _Around:
    """Watches the meta shape check of a pipelined model: the hidden state entering the
    layer stack (what stages exchange) and which parameters are used before the stack
    (first stage) and after it (last stage)."""

    def __init__(self, model: nn.Module, stack: str) -> None:
        self.model, self.layers = model, model.get_submodule(stack)
        self.hidden: tuple[tuple[int, ...], torch.dtype] | None = None
        self.tuple_out = False
        self.phase = "pre"
        self.used: dict[str, set[nn.Module]] = {"pre": set(), "post": set()}
        self.handles: list = []

    def __enter__(self) -> _Around:
        def enter(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs[hidden_key(kwargs)]
            if self.hidden is None:
                self.hidden = (tuple(x.shape), x.dtype)
            self.phase = "in"

        def leave(mod: nn.Module, args: tuple, out: object) -> None:
            self.phase = "post"
            self.tuple_out = isinstance(out, (tuple, list))

        def use(mod: nn.Module, args: tuple) -> None:
            if self.phase in self.used:
                self.used[self.phase].add(mod)
        self.handles = [self.layers[0].register_forward_pre_hook(enter, with_kwargs=True),
                        self.layers[-1].register_forward_hook(leave),
                        nn.modules.module.register_module_forward_pre_hook(use)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def names(self, phase: str, aliases: list[tuple[str, str]]) -> set[str]:
        canon = dict(aliases)
        out = set()
        for prefix, mod in self.model.named_modules(remove_duplicate=False):
            if mod in self.used[phase]:
                for n, _ in mod.named_parameters(recurse=False, remove_duplicate=False):
                    full = f"{prefix}.{n}" if prefix else n
                    out.add(canon.get(full, full))
        return out


def _pipeline(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules,
              options: Options) -> tuple[Pipe, str, int] | None:
    """The pipeline a pp > 1 mesh asks for, validated (layers, microbatches, schedule)."""
    if mesh.pp == 1:
        return None
    found = layer_stack(model)
    if found is None:
        raise sl.ShardingError(
            f"{mesh!r} has pp={mesh.pp} but {type(model).__name__} marks no layer stack: tag "
            "the nn.ModuleList of layers with sl.axes(self.blocks, 'layers') in the model, "
            "or from outside with sl.annotate(model, {'<path>': ('layers',)})")
    stack, mods = found
    if rules.spec(("layers",), where=stack).mesh_axes != ("pp",):
        raise sl.ShardingError(
            f"the rules map 'layers' to {rules.spec(('layers',), where=stack)}, but a pipeline "
            "splits the layer stack over pp only; use the rule layers=pp")
    schedule = options.pipeline_schedule
    v = options.virtual or (2 if schedule is Schedule.INTERLEAVED else 1)
    m = options.microbatches or mesh.pp
    pipe = Pipe(schedule, mesh.pp, m, v)
    ways = math.prod(mesh.axis_size(a) for a in rules.spec(("batch",), where="the batch").mesh_axes)
    check_pipe(pipe, n_layers=len(mods), where=f"{type(model).__name__}.{stack}",
               batch=options.batch, dp_ways=ways)
    return pipe, stack, len(mods)

