"""The three execution modes behind one API: ``explain`` (dry), ``simulate``, ``run``.

Each builds the model from its factory (on meta tensors in dry mode), lowers it, and
trains or traces one step under the matching session; all three record the same
schedule for the same rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import shardlang as sl
from lowering.analytic import AxisVolume, analytic_volume
from lowering.plan import Plan, lower
from lowering.registry import ModelRef
from lowering.runtime import Mode, Session, session
from lowering.schedule import RankSchedules, Record
from lowering.train import (StepCallback, TrainConfig, TrainResult, reference, train,
                            train_pipeline)
from models.datasets import ArithmeticSequences, Batches

__all__ = ["Layout", "Explained", "Parity", "explain", "simulate", "run", "check_parity",
           "traced_ranks"]


@dataclass(frozen=True)
class Layout:
    """Everything that fixes a run: model, mesh, rules and options."""

    model: ModelRef
    mesh: sl.Mesh
    rules: sl.Rules = field(default_factory=sl.Rules.default)
    fsdp: bool = False
    batch: int | None = None
    seq: int | None = None
    seed: int = 0
    load_balance: bool = False
    schedule: str = "1f1b"           # pipeline (pp > 1) options
    microbatches: int | None = None  # default: pp
    virtual: int | None = None       # default: 2 for interleaved, else 1

    def shapes(self, model: torch.nn.Module) -> tuple[int, int]:
        """(batch, seq). Under a pipeline the default batch is the preset's batch per
        microbatch (times the microbatches), so a preset runs on any pp as it is."""
        batch = self.batch
        if batch is None:
            m = (self.microbatches or self.mesh.pp) if self.mesh.pp > 1 else 1
            batch = self.model.batch * m
        return batch, self.seq or self.model.default_seq(model)

    def plan(self, model: torch.nn.Module) -> Plan:
        batch, seq = self.shapes(model)
        return lower(model, self.mesh, self.rules, fsdp=self.fsdp, batch=batch, seq=seq,
                     load_balance=self.load_balance, schedule=self.schedule,
                     microbatches=self.microbatches, virtual=self.virtual)

    def config(self, plan: Plan, model: torch.nn.Module, **kw: object) -> TrainConfig:
        batch, seq = self.shapes(model)
        m = plan.pipe.microbatches if plan.pipe else 1
        return TrainConfig(batch=batch, seq=seq, seed=self.seed, microbatches=m,
                           batch_ways=plan.batch_ways, **kw)  # type: ignore[arg-type]


@dataclass
class Explained:
    plan: Plan
    schedules: RankSchedules
    analytic: dict[str, AxisVolume]
    traced: list[int]


def traced_ranks(mesh: sl.Mesh, ranks: Sequence[int] | None) -> list[int]:
    """Which ranks to trace. Every rank of a pipeline stage runs the same SPMD program,
    so past 16 ranks ``--all-ranks`` traces local rank 0 of every stage and gives every
    rank its own groups. One trace covers every pipeline stage (they run together)."""
    if ranks is None or len(ranks) > 16:
        return [0]
    stage = mesh.size // mesh.pp
    return sorted({r % stage for r in ranks})


def _dry_trace(layout: Layout, rank: int, data: Batches, model: torch.nn.Module | None = None,
               watch: Callable[[dict[int, torch.nn.Module], Session], None] | None = None,
               ) -> tuple[Plan, dict[int, list[Record]], dict[int, torch.nn.Module]]:
    """Trace one step on meta tensors; records per pipeline coordinate (all of them)."""
    # a trace distributes the model in place: each traced rank gets a fresh meta build
    model = model or layout.model.build(seed=layout.seed, meta=True)
    plan = layout.plan(model)
    cfg = layout.config(plan, model, steps=1)
    with session(layout.mesh, Mode.DRY, rank=rank) as sess:
        models = {0: model} | {r: layout.model.build(seed=layout.seed, meta=True)
                               for r in range(1, layout.mesh.pp)}
        if watch is not None:
            watch(models, sess)
        if plan.pipe is None:
            return plan, {0: train(model, plan, sess, data, cfg).records}, {0: model}
        result = train_pipeline(models, plan, sess, data, cfg)
    return plan, result.stage_records, models


def explain(layout: Layout, *, ranks: Sequence[int] | None = None,
            data: Batches | None = None,
            watch: Callable[[dict[int, torch.nn.Module], Session], None] | None = None,
            ) -> Explained:
    """Dry mode: trace one step on meta tensors with the fake backend and return every
    asked-for rank's schedule (``ranks=None``: rank 0) and the analytic volumes."""
    want = list(ranks) if ranks is not None else [0]
    for r in want:
        if not 0 <= r < layout.mesh.size:
            raise sl.ShardingError(
                f"--rank {r} is outside {layout.mesh!r} (ranks 0..{layout.mesh.size - 1})")
    fresh: torch.nn.Module | None = layout.model.build(seed=layout.seed, meta=True)
    data = data or ArithmeticSequences(layout.model.vocab_size(fresh))
    traces: dict[int, dict[int, list[Record]]] = {}
    plan = models = None
    stage = layout.mesh.size // layout.mesh.pp
    for r in traced_ranks(layout.mesh, want):
        plan, traces[r], models = _dry_trace(layout, r, data, fresh, watch)
        fresh, watch = None, None
    assert plan is not None and models is not None, "at least one rank is traced"
    shown = want[0] // stage  # the totals compare the first asked-for rank's stage
    model = models[shown]
    batch, seq = layout.shapes(model)
    sched = RankSchedules(layout.mesh, {"name": layout.model.name, "params": plan.n_params},
                          {r: traces.get(r % stage, traces[min(traces)])[r // stage]
                           for r in want})
    traced = sorted(pp * stage + r for r in traces for pp in range(layout.mesh.pp))
    return Explained(plan, sched, analytic_volume(plan, model, batch=batch, seq=seq,
                                                  pp_rank=shown), traced)


def gather_records(records: list[Record], world: int) -> dict[int, list[Record]]:
    """Run mode: every rank's recorded schedule, on every rank (not itself recorded)."""
    import torch.distributed as dist

    everyone: list[list[Record] | None] = [None] * world
    dist.all_gather_object(everyone, records)
    return {r: list(recs or []) for r, recs in enumerate(everyone)}


@dataclass
class Parity:
    ok: bool
    worst_param: str
    worst_rank: int
    worst_err: float
    loss_err: float
    lines: list[str]


def check_parity(got: TrainResult, ref: TrainResult, *, rtol: float = 1e-5,
                 atol: float = 1e-5, curve_tol: float = 1e-4) -> Parity:
    """Every rank's loss (each step) and step-0 gradients against the single-device run."""
    lines: list[str] = []
    ok, worst = True, ("", 0, 0.0)
    for name, per_rank in got.grads.items():
        want = ref.grads[name][0]
        for r, g in enumerate(per_rank):
            if g is None:  # a pipeline stage that does not hold this parameter
                continue
            err = (g - want).abs().max().item()
            if err > worst[2]:
                worst = (name, r, err)
            if not torch.allclose(g, want, rtol=rtol, atol=atol):
                ok = False
    loss_err = 0.0
    for step, (ls, (want,)) in enumerate(zip(got.losses, ref.losses)):
        for r, v in enumerate(ls):
            err = abs(v - want)
            loss_err = max(loss_err, err)
            tol = atol + rtol * abs(want) if step == 0 else curve_tol
            if err > tol:
                ok = False
                lines.append(f"step {step} rank {r}: loss {v:.6f} vs single device {want:.6f}")
    lines.append(f"worst gradient error {worst[2]:.2e} in {worst[0] or '-'} on rank {worst[1]}; "
                 f"worst loss error {loss_err:.2e}")
    return Parity(ok, worst[0], worst[1], worst[2], loss_err, lines)


def simulate(layout: Layout, *, steps: int = 1, check: bool = False, data: Batches | None = None,
             lr: float = 3e-3, on_step: StepCallback | None = None
             ) -> tuple[TrainResult, Parity | None]:
    """Simulate mode: every rank in this process; with ``check``, compare with one device."""
    return _train_mode(layout, Mode.SIMULATE, steps=steps, check=check, data=data, lr=lr,
                       on_step=on_step)


def run(layout: Layout, *, steps: int = 1, check: bool = False, data: Batches | None = None,
        lr: float = 3e-3, on_step: StepCallback | None = None,
        check_collectives: str = "first") -> tuple[TrainResult, Parity | None]:
    """Run mode, inside a torchrun worker: this process is one rank. Collectives are
    checked across their group before they are issued (``check_collectives``: the
    ``"first"`` step, ``"all"`` steps or ``"off"``), so a divergence fails fast."""
    if check_collectives not in ("first", "all", "off"):
        raise sl.ShardingError(
            f"--check-collectives {check_collectives!r}: choose first, all or off")
    return _train_mode(layout, Mode.RUN, steps=steps, check=check, data=data, lr=lr,
                       on_step=on_step, check_collectives=check_collectives)


def _train_mode(layout: Layout, mode: Mode, *, steps: int, check: bool, data: Batches | None,
                lr: float, on_step: StepCallback | None,
                watch: Callable[[dict[int, torch.nn.Module], Session], None] | None = None,
                finish: Callable[[Session], None] | None = None,
                check_collectives: str = "first",
                ) -> tuple[TrainResult, Parity | None]:
    if layout.model.dry_only:
        raise sl.ShardingError(
            f"{layout.model.name} is too large to {mode.value} here (dry mode only): use "
            f"'shardlang explain {layout.model.name} --mesh {layout.mesh}'"
        )
    model = layout.model.build(seed=layout.seed)
    plan = layout.plan(model)
    data = data or ArithmeticSequences(layout.model.vocab_size(model))
    cfg = layout.config(plan, model, steps=steps, lr=lr, keep_grads=check,
                        check_collectives=check_collectives)
    with session(layout.mesh, mode) as sess:
        mine = [sess.rank // sess.stage_world] if mode is Mode.RUN else range(layout.mesh.pp)
        models = {r: model if r == mine[0] else layout.model.build(seed=layout.seed)
                  for r in mine}
        if watch is not None:
            watch(models, sess)
        if plan.pipe is None:
            result = train(model, plan, sess, data, cfg, on_step=on_step)
        else:
            result = train_pipeline(models, plan, sess, data, cfg, on_step=on_step)
        if finish is not None:
            finish(sess)
        if mode is Mode.RUN:
            result.rank_records = gather_records(result.records, sess.world)
    parity = check_parity(result, reference(layout.model.factory, data, cfg)) if check else None
    return result, parity
