"""The three execution modes behind one API: ``explain`` (dry), ``simulate``, ``run``.

Each builds the model from its factory (on meta tensors in dry mode), lowers it, and
trains or traces one step under the matching session; all three record the same
schedule for the same rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

import shardlang as sl
from lowering.plan import (AxisVolume, Device, Memory, Options, Plan, Predicted, Recompute,
                           StackCost, analytic_volume, lower, predict, recomputed_compute,
                           recomputed_records, check_executed)
from lowering.run.guard import CheckMode
from lowering.run.parity import Parity, check_parity
from lowering.run.registry import ModelRef, resolve
from lowering.run.session import Mode, Session, session
from lowering.run.train import (Checkpointing, StepCallback, TrainConfig, TrainResult,
                                reference, train)
from lowering.run.pipeline_loop import train_pipeline
from lowering.schedule import Cost, RankSchedules, Record
from models.datasets import ArithmeticSequences, Batches

__all__ = ["Layout", "Explained", "explain", "simulate", "run", "train_layout", "traced_ranks"]

Watch = Callable[[dict[int, torch.nn.Module], Session], None]


@dataclass(frozen=True, init=False)
class Layout:
    """Everything that fixes a run: model, mesh, rules, options and seed. Option keywords
    (the fields of :class:`lowering.Options`) may be given directly.

    Example:
        >>> from lowering.run import Layout
        >>> Layout.of("gpt-tiny", "dp=2,tp=2", fsdp=True).options.fsdp
        True
    """

    model: ModelRef
    mesh: sl.Mesh
    rules: sl.Rules
    options: Options
    seed: int

    def __init__(self, model: ModelRef, mesh: sl.Mesh, rules: sl.Rules | None = None,
                 options: Options | None = None, seed: int = 0, **keywords: object) -> None:
        if options is not None and keywords:  # keywords change the given options
            Options.of(**keywords)  # (an unknown keyword is a ShardingError)
            options = dataclasses.replace(options, **keywords)  # type: ignore[arg-type]
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "mesh", mesh)
        object.__setattr__(self, "rules", rules if rules is not None else sl.Rules.default())
        object.__setattr__(self, "options", options or Options.of(**keywords))
        object.__setattr__(self, "seed", seed)

    @classmethod
    def of(cls, model: str | ModelRef, mesh: str | sl.Mesh, rules: str | sl.Rules = "", *,
           seed: int = 0, **options: object) -> Layout:
        """A layout from the CLI's spellings: ``Layout.of("gpt-tiny", "dp=2,tp=2",
        "norm_seq=tp", fsdp=True)`` (rules on top of the defaults)."""
        ref = resolve(model) if isinstance(model, str) else model
        m = sl.Mesh.parse(mesh) if isinstance(mesh, str) else mesh
        r = rules if isinstance(rules, sl.Rules) else sl.Rules.parse(rules, base=sl.Rules.default())
        return cls(ref, m, r, Options.of(**options), seed)

    def shapes(self, model: torch.nn.Module) -> tuple[int, int]:
        """(batch, seq). The default batch is the preset's, rounded up to a multiple of
        the ranks the batch is split over (dp=64 gets 64 rows); under a pipeline that per
        microbatch (times the microbatches), so a preset runs on any mesh as it is."""
        batch = self.options.batch
        if batch is None:  # the preset's batch, rounded up to a multiple of the batch shards
            m = (self.options.microbatches or self.mesh.pp) if self.mesh.pp > 1 else 1
            ways = math.prod(self.mesh.axis_size(a) for a in
                             self.rules.spec(("batch",), where="the batch").mesh_axes)
            batch = -(-self.model.batch // ways) * ways * m
        return batch, self.options.seq or self.model.default_seq(model)

    def plan(self, model: torch.nn.Module) -> Plan:
        batch, seq = self.shapes(model)
        return lower(model, self.mesh, self.rules,
                     options=dataclasses.replace(self.options, batch=batch, seq=seq))

    def config(self, plan: Plan, model: torch.nn.Module, **kw: object) -> TrainConfig:
        batch, seq = self.shapes(model)
        m = plan.pipe.microbatches if plan.pipe else 1
        return TrainConfig(batch=batch, seq=seq, seed=self.seed, microbatches=m,
                           batch_ways=plan.batch_ways, precision=str(plan.options.precision),
                           **kw)  # type: ignore[arg-type]


@dataclass
class Explained:
    plan: Plan
    schedules: RankSchedules
    analytic: dict[str, AxisVolume]
    traced: list[int]
    memory: dict[int, Memory] = dataclasses.field(default_factory=dict)  # traced rank -> bytes
    #: the first traced rank's compute: pp coordinate -> (F/B/O, chunk) -> one microbatch's
    compute: dict[int, dict[tuple[str, int], Cost]] = dataclasses.field(default_factory=dict)
    stage_records: dict[int, list[Record]] = dataclasses.field(default_factory=dict)  # likewise
    tokens: int = 0           # the global batch's tokens per step
    precision: str = "fp32"
    #: likewise: pp coordinate -> chunk -> the layer stack's forward (for recompute)
    stack: dict[int, dict[int, StackCost]] = dataclasses.field(default_factory=dict)
    #: each trace's memory report for a plan (:meth:`with_recompute`)
    reports: list[Callable[[Plan], dict[int, Memory]]] = dataclasses.field(default_factory=list)

    def with_recompute(self, mode: str) -> Explained:
        """The same trace under another recompute mode: a dry trace runs the same ops
        whatever the mode, which changes only the memory report and the prediction
        (``plan`` asks this of a traced layout that does not fit, instead of a second trace)."""
        options = dataclasses.replace(self.plan.options, recompute=Recompute.parse(mode))
        plan = dataclasses.replace(self.plan, options=options)
        memory: dict[int, Memory] = {}
        for report in self.reports:
            memory.update(report(plan))
        return dataclasses.replace(self, plan=plan,
                                   memory={r: memory[r] for r in self.memory if r in memory})

    def predict(self, dev: Device, *, gpus_per_node: int | None = None) -> Predicted:
        """The step's predicted time on ``dev`` (:mod:`lowering.plan.time`), under the
        plan's recompute (:mod:`lowering.plan.recompute`)."""
        mode, pipe = self.plan.options.recompute, self.plan.pipe
        m = pipe.microbatches if pipe else 1
        compute = {r: recomputed_compute(c, self.stack.get(r, {}), mode)
                   for r, c in self.compute.items()}
        records = {r: recomputed_records(rs, self.stack.get(r, {}), mode, m)
                   for r, rs in self.stage_records.items()}
        return predict(self.plan.mesh, dev, precision=self.precision, compute=compute,
                       records=records, pipe=pipe, tokens=self.tokens,
                       gpus_per_node=gpus_per_node)


def traced_ranks(mesh: sl.Mesh, ranks: Sequence[int] | None) -> list[int]:
    """Which ranks to trace. Every rank of a pipeline stage runs the same SPMD program,
    so past 16 ranks ``--all-ranks`` traces local rank 0 of every stage and gives every
    rank its own groups. One trace covers every pipeline stage (they run together)."""
    if ranks is None or len(ranks) > 16:
        return [0]
    stage = mesh.size // mesh.pp
    return sorted({r % stage for r in ranks})


Traced = tuple[Plan, dict[int, list[Record]], dict[int, torch.nn.Module], TrainResult]


def _dry_trace(layout: Layout, rank: int, data: Batches, model: torch.nn.Module | None = None,
               watch: Watch | None = None) -> Traced:
    """Trace one step on meta tensors; records per pipeline coordinate (all of them)."""
    # a trace distributes the model in place: each traced rank gets a fresh meta build
    model = model or layout.model.build(seed=layout.seed, meta=True)
    # every pipeline stage starts from a fresh build of the whole model (not a deep copy: a
    # copy's wrapped forward or hook closures would still call the original's modules)
    stages = {r: layout.model.build(seed=layout.seed, meta=True) for r in range(1, layout.mesh.pp)}
    plan = layout.plan(model)
    cfg = layout.config(plan, model, steps=1, vocab=data.vocab_size, memory=True)
    with session(layout.mesh, Mode.DRY, rank=rank) as sess:
        models = {0: model} | stages
        if watch is not None:
            watch(models, sess)
        if plan.pipe is None:
            result = train(model, plan, sess, data, cfg)
            return plan, {0: result.records}, {0: model}, result
        result = train_pipeline(models, plan, sess, data, cfg)
    return plan, result.stage_records, models, result


def explain(layout: Layout, *, ranks: Sequence[int] | None = None,
            data: Batches | None = None, watch: Watch | None = None) -> Explained:
    """Dry mode: trace one step on meta tensors with the fake backend and return every
    asked-for rank's schedule (``ranks=None``: rank 0) and the analytic volumes."""
    want = list(ranks) if ranks is not None else [0]
    for r in want:
        if not 0 <= r < layout.mesh.size:
            raise sl.ShardingError(
                f"--rank {r} is outside {layout.mesh!r} (ranks 0..{layout.mesh.size - 1})")
    fresh = layout.model.build(seed=layout.seed, meta=True)
    data = data or ArithmeticSequences(layout.model.vocab_size(fresh))
    traces: dict[int, dict[int, list[Record]]] = {}
    stage = layout.mesh.size // layout.mesh.pp
    first, *rest = traced_ranks(layout.mesh, want)
    plan, traces[first], models, result = _dry_trace(layout, first, data, fresh, watch)
    memory, reports = dict(result.memory), [result.report]
    for r in rest:
        _, traces[r], _, more = _dry_trace(layout, r, data)
        memory.update(more.memory)
        reports.append(more.report)
    shown = want[0] // stage  # the totals compare the first asked-for rank's stage
    model = models[shown]
    batch, seq = layout.shapes(model)
    sched = RankSchedules(layout.mesh, {"name": layout.model.name, "params": plan.n_params},
                          {r: traces.get(r % stage, traces[min(traces)])[r // stage]
                           for r in want})
    traced = sorted(pp * stage + r for r in traces for pp in range(layout.mesh.pp))
    return Explained(plan, sched, analytic_volume(plan, model, batch=batch, seq=seq,
                                                  pp_rank=shown), traced,
                     {r: memory[r] for r in want if r in memory}, result.compute,
                     traces[first], batch * seq, layout.options.precision.value, result.stack,
                     [r for r in reports if r is not None])


def gather_records(records: list[Record], world: int) -> dict[int, list[Record]]:
    """Run mode: every rank's recorded schedule, on every rank (not itself recorded)."""
    everyone: list[list[Record] | None] = [None] * world
    dist.all_gather_object(everyone, records)
    return {r: list(recs or []) for r, recs in enumerate(everyone)}


def simulate(layout: Layout, *, steps: int = 1, check: bool = False, data: Batches | None = None,
             lr: float = 3e-3, on_step: StepCallback | None = None,
             checkpoint: Checkpointing | None = None, memory: bool = False,
             ) -> tuple[TrainResult, Parity | None]:
    """Simulate mode: every rank in this process; with ``check``, compare with one device;
    with ``memory``, count step 0's bytes per rank (``result.memory``, measured)."""
    return train_layout(layout, Mode.SIMULATE, steps=steps, check=check, data=data, lr=lr,
                        on_step=on_step, checkpoint=checkpoint, memory=memory)


def run(layout: Layout, *, steps: int = 1, check: bool = False, data: Batches | None = None,
        lr: float = 3e-3, on_step: StepCallback | None = None,
        check_collectives: CheckMode | str = CheckMode.FIRST,
        checkpoint: Checkpointing | None = None) -> tuple[TrainResult, Parity | None]:
    """Run mode, inside a torchrun worker: this process is one rank. Collectives are
    checked across their group before they are issued (``check_collectives``: the
    ``"first"`` step, ``"all"`` steps or ``"off"``), so a divergence fails fast."""
    return train_layout(layout, Mode.RUN, steps=steps, check=check, data=data, lr=lr,
                        on_step=on_step, check_collectives=CheckMode.parse(check_collectives),
                        checkpoint=checkpoint)


def _check_training(steps: int, lr: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise sl.ShardingError(f"steps={steps!r} (--steps {steps}): train at least 1 step")
    if not (isinstance(lr, (int, float)) and lr >= 0 and lr == lr):
        raise sl.ShardingError(
            f"lr={lr!r} (--lr {lr}): the learning rate must be a number >= 0 (AdamW; "
            "3e-3 trains gpt-tiny)")


def train_layout(layout: Layout, mode: Mode, *, steps: int, check: bool = False,
                 data: Batches | None = None, lr: float = 3e-3,
                 on_step: StepCallback | None = None, watch: Watch | None = None,
                 check_collectives: CheckMode = CheckMode.FIRST,
                 checkpoint: Checkpointing | None = None, memory: bool = False,
                 ) -> tuple[TrainResult, Parity | None]:
    """Train ``layout`` for ``steps`` in simulate or run mode (``watch`` sees every stage
    model and the session before the first step: :func:`lowering.debug.inspect` hooks it)."""
    _check_training(steps, lr)
    check_executed(layout.options, f"{mode.value} mode")
    if layout.model.dry_only:
        raise sl.ShardingError(
            f"{layout.model.name} is too large to {mode.value} here (dry mode only): use "
            f"'shardlang explain {layout.model.name} --mesh {layout.mesh}'"
        )
    model = layout.model.build(seed=layout.seed, shards=True)
    plan = layout.plan(model)
    data = data or ArithmeticSequences(layout.model.vocab_size(model))
    cfg = layout.config(plan, model, steps=steps, lr=lr, keep_grads=check,
                        check_collectives=check_collectives, vocab=data.vocab_size,
                        checkpoint=checkpoint, memory=memory)
    with session(layout.mesh, mode) as sess:
        mine = [sess.rank // sess.stage_world] if mode is Mode.RUN else range(layout.mesh.pp)
        models = {r: model if r == mine[0] else layout.model.build(seed=layout.seed, shards=True)
                  for r in mine}
        if watch is not None:
            watch(models, sess)
        if plan.pipe is None:
            result = train(model, plan, sess, data, cfg, on_step=on_step)
        else:
            result = train_pipeline(models, plan, sess, data, cfg, on_step=on_step)
        if mode is Mode.RUN:
            result.rank_records = gather_records(result.records, sess.world)
    parity = None
    if check:
        ref = reference(layout.model.factory, data, cfg)
        fp32 = (reference(layout.model.factory, data, dataclasses.replace(cfg, precision="fp32"))
                if cfg.precision == "bf16" else None)
        parity = check_parity(result, ref, fp32=fp32)
    return result, parity
