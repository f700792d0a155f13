"""``lower(model, mesh, rules)``: the static plan, pure data.

For every parameter: its logical axes, spec, DTensor placements and tensor-parallel
role; plus the mesh, rules and options. The collective schedule is recorded from this
plan by dry, simulate or run mode (:mod:`lowering.modes`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import Placement

import shardlang as sl
from lowering.checks import ShapeTrace, check_activations
from lowering.pipeline import Pipe, Schedule, check_pipe
from lowering.placements import fsdp_dim, placements, tensor_axes
from lowering.tensor import Role, tp_role

__all__ = ["ParamPlan", "Plan", "Options", "lower"]


@dataclass(frozen=True)
class Options:
    """Lowering options (keywords of :func:`lower`)."""

    fsdp: bool = False
    batch: int | None = None
    seq: int | None = None
    load_balance: bool = False  # causal sequence chunks r and 2n-1-r on sp rank r
    schedule: str = "1f1b"      # pipeline schedule (pp > 1): gpipe, 1f1b, interleaved
    microbatches: int | None = None  # pipeline microbatches (default: pp)
    virtual: int | None = None  # chunks per pipeline rank (default: 2 interleaved, else 1)


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
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    mesh: sl.Mesh
    rules: sl.Rules
    options: Options
    params: tuple[ParamPlan, ...]
    aliases: tuple[tuple[str, str], ...]  # (tied name, name it shares storage with)
    trace: ShapeTrace = ShapeTrace()      # what the meta shape check saw (needs batch, seq)
    pipe: Pipe | None = None              # the pipeline (pp > 1)
    stack: str = ""                       # path of the module marked 'layers'
    n_layers: int = 0
    hidden: tuple[tuple[int, ...], torch.dtype] | None = None  # stack input: global shape, dtype
    layer_tuple: bool = False             # the layers return a tuple (hidden state first)
    pre: frozenset[str] = frozenset()    # parameters used before the stack (first stage)
    post: frozenset[str] = frozenset()   # ... and after it (last stage)

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
        return sum(p.nbytes // p.dtype.itemsize for p in self.params)


def _used_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for p in model.parameters():
        out.update(a for a in (sl.logical_axes(p) or ()) if a)
    return out


def _check_options(mesh: sl.Mesh, options: Options) -> None:
    if options.batch is not None:
        sl.rules.check_divisible((options.batch,), ("batch",), sl.P(("dp", "ep")), mesh,
                                 where="the input batch")
    if options.load_balance and options.seq is not None and mesh.sp > 1:
        sl.rules.check_divisible((options.seq,), ("seq",), sl.P("sp"), mesh,
                                 where="the sequence (load-balanced: 2*sp chunks)", even={0: 2})


def lower(model: nn.Module, mesh: sl.Mesh, rules: sl.Rules, *, fsdp: bool = False,
          batch: int | None = None, seq: int | None = None, load_balance: bool = False,
          schedule: str = "1f1b", microbatches: int | None = None, virtual: int | None = None,
          extra_names: Iterable[str] = ()) -> Plan:
    """Validate a layout and derive every parameter's placements.

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
    options = Options(fsdp=fsdp, batch=batch, seq=seq, load_balance=load_balance,
                      schedule=schedule, microbatches=microbatches, virtual=virtual)
    _check_options(mesh, options)
    pipe, stack, n_layers = _pipeline(model, mesh, rules, options)
    trace = ShapeTrace()
    around = _Around(model, stack) if pipe is not None else None
    if batch is not None and seq is not None:
        with around or contextlib.nullcontext():
            trace = check_activations(model, mesh, rules, batch=batch, seq=seq)
    rules.check_names(_used_names(model) | set(extra_names) | trace.names)
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
        # FSDP re-gathers by recomputing the owning module in backward; a module that runs
        # a shard_map would replay its collectives, so its parameters stay unsharded over dp
        fdim = (fsdp_dim(spec, p.shape, mesh)
                if fsdp and mesh.dp > 1 and owner_name not in trace.shard_map_modules else None)
        owner = modules[owner_name]
        plans.append(ParamPlan(
            name=name, shape=tuple(p.shape), dtype=p.dtype, axes=axes, spec=spec,
            placements=placements(spec, mesh, fsdp=fdim), role=tp_role(owner, spec, p.dim(), mesh),
            fsdp_dim=fdim,
        ))
    return Plan(mesh=mesh, rules=rules, options=options, params=tuple(plans),
                aliases=tuple(aliases), trace=trace, pipe=pipe, stack=stack, n_layers=n_layers,
                hidden=around.hidden if around else None,
                layer_tuple=around.tuple_out if around else False,
                pre=frozenset(around.names("pre", aliases)) if around else frozenset(),
                post=frozenset(around.names("post", aliases)) if around else frozenset())


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
            from lowering.stages import hidden_key
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
              options: Options) -> tuple[Pipe | None, str, int]:
    """The pipeline a pp > 1 mesh asks for, validated (layers, microbatches, schedule)."""
    from lowering.stages import layer_stack

    schedule = Schedule.parse(options.schedule)
    m = options.microbatches
    if mesh.pp == 1:
        if m not in (None, 1):
            raise sl.ShardingError(
                f"--microbatches {m} needs a pipeline (pp > 1 in the mesh {mesh!r})")
        return None, "", 0
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
    v = options.virtual or (2 if schedule is Schedule.INTERLEAVED else 1)
    pipe = Pipe(schedule, mesh.pp, m or mesh.pp, v)
    ways = math.prod(mesh.axis_size(a) for a in rules.spec(("batch",), where="the batch").mesh_axes)
    check_pipe(pipe, n_layers=len(mods), where=f"{type(model).__name__}.{stack}",
               batch=options.batch, dp_ways=ways)
    return pipe, stack, len(mods)
