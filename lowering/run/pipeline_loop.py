"""The training loop of a pipelined plan (:func:`lowering.run.train.train`'s, for pp > 1):
every pipeline rank's actions in this process (dry and simulate modes), or this process's
own stage under ``torch.distributed.pipelining`` (run mode)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

import shardlang as sl
from lowering.parallel import DTensorContext, distribute_model, read_whole_weights
from lowering.parallel.pipeline import StageModel, sum_shared_grads
from lowering.parallel.pipeline_step import (dummy_tokens, funcol_all_reduce,
                                             in_process_all_reduce, reduce_grads,
                                             step_in_process, step_torch)
from lowering.plan import Kind, Plan, Slot, bubble_of, microbatch_rows
from lowering.run import checkpoint
from lowering.run.memory import MemoryMeter
from lowering.run.session import Mode, Session, group_axes
from lowering.run.stack_watch import StackWatch
from lowering.run.train import (StepCallback, TrainConfig, TrainResult, _active, _batch,
                                _checker, _finish, _guarded, _Holder, _null, _recording,
                                _values)
from lowering.schedule import Cost, Phase, Recorder
from models.datasets import Batches

__all__ = ["train_pipeline"]


def train_pipeline(models: Mapping[int, nn.Module], plan: Plan, sess: Session, data: Batches,
                   cfg: TrainConfig, *, on_step: StepCallback | None = None) -> TrainResult:
    """:func:`train` for a pipelined plan. ``models`` maps a pipeline coordinate to that
    rank's model: every coordinate in dry and simulate modes (run in schedule order in
    this process), this process's own in run mode."""
    pipeline = plan.pipeline
    if pipeline is None:
        raise sl.ShardingError("train_pipeline needs a plan with pp > 1")
    pipe = pipeline.pipe
    run, dry = sess.mode is Mode.RUN, sess.mode is Mode.DRY
    local = sess.stage_world if sess.mode is Mode.SIMULATE else 1
    stages = {r: StageModel(m, plan, pipeline, r) for r, m in models.items()}
    recs = {r: _guarded(Recorder(group_axes(sess)), sess, cfg) for r in stages}
    for rec in recs.values():
        rec.count_compute = dry and cfg.memory
    ctxs: dict[int, DTensorContext | None] = {}
    opts = {}
    for r, st in stages.items():
        if sess.dmesh is not None:
            distribute_model(st.model, plan, sess.dmesh)
        else:
            read_whole_weights(st.model)
        st.dmesh = sess.dmesh
        ctxs[r] = DTensorContext(plan, sess.dmesh, recs[r]) if sess.dmesh is not None else None
        opts[r] = torch.optim.AdamW(st.model.parameters(), lr=cfg.lr, foreach=True)
    meter = (MemoryMeter({r: st.model for r, st in stages.items()}, ranks=local, dry=dry)
             if cfg.memory and not run else None)
    m = pipe.microbatches
    watch = (StackWatch({r: st.blocks for r, st in stages.items()}, pipe, meter, recs,
                        next(iter(stages.values())).n_layers)
             if meter is not None and dry else None)
    rows = microbatch_rows(cfg.batch, plan.batch_ways, m)
    tokens = dummy_tokens((cfg.batch // m, cfg.seq), "meta" if dry else sess.device)
    result = TrainResult()
    costs: dict = {}
    ck = cfg.checkpoint if not dry else None
    first = _resume(stages, opts, sess, ck.directory) if ck and ck.resume else 0

    def constrain(r: int) -> Callable[[torch.Tensor, sl.Axes], torch.Tensor]:
        ctx = ctxs[r]
        return ctx.constrain if ctx is not None else (lambda x, axes: x)

    for step in range(first, cfg.steps):
        t0 = time.perf_counter()
        idx, tgt = _batch(data, step, cfg, next(iter(ctxs.values())), dry=dry, rows=rows)
        if run and sess.device != "cpu":
            idx, tgt = idx.to(sess.device), tgt.to(sess.device)
        live = {r: (recs[r] if step == 0 else _checker(sess, cfg, None)) for r in stages}
        mm = meter if step == 0 else None
        if mm is not None:
            mm.inputs(idx, tgt)

        @contextlib.contextmanager
        def active(r: int) -> Iterator[None]:
            with _recording(live[r]), _active(ctxs[r], live[r]), (mm.saving(r) if mm else _null()):
                yield

        if run:
            (r, st), = stages.items()
            with active(r):
                out = step_torch(st, ctxs[r], live[r], pipe, idx, tgt, sess.pp_group,
                                 torch.device(sess.device), tokens, constrain(r))
                reduce_grads(st, pipe, live[r])
                sum_shared_grads(st, funcol_all_reduce(sess.pp_group), live[r])
        else:
            out = step_in_process(stages, {r: constrain(r) for r in stages}, live, pipe,
                                  list(idx.chunk(m)), list(tgt.chunk(m)), active, tokens,
                                  around=mm.action if mm else None)
            if step == 0:
                costs = out.costs
            for r, st in stages.items():
                with active(r):
                    reduce_grads(st, pipe, live[r])
            reduce = in_process_all_reduce(stages, live, pipe.pp)
            for r, st in stages.items():
                with active(r):
                    sum_shared_grads(st, reduce(r), live[r])
        if step == 0 and cfg.keep_grads and not dry:
            result.grads = _stage_grads(stages, local, sess)
        for r, st in stages.items():
            with active(r), (live[r].site("optimizer", Phase.OPTIMIZER) if live[r] else _null()):
                if mm is not None:
                    mm.after_backward(r)
                opts[r].step()
                if mm is not None:
                    mm.after_optimizer(opts[r], r)
                opts[r].zero_grad(set_to_none=True)
        if dry:
            continue
        losses = _pipeline_losses(out.losses, m, local, sess)
        # the first microbatch's sl.metric values (those of layers this process runs)
        metrics = {k: _values(v, local)[0].tolist() for k, v in out.metrics.items()}
        if run:
            result.bubble.append(_measured_bubble(out.slots, pipe.pp, sess))
        _finish(result, step, losses, metrics, t0, cfg, on_step)
        if ck and (path := ck.due(step)):
            holder, opt = _saving(stages, opts, sess)
            checkpoint.save(holder, path, step=step + 1, optimizer=opt)  # type: ignore[arg-type]
    result.stage_records = {r: recs[r].records for r in stages}
    if dry and cfg.memory:
        result.compute = {r: {("F" if k is Kind.F else "B", c): cost
                              for (pr, k, c), cost in costs.items() if pr == r}
                          | {("O", 0): recs[r].compute.get(Phase.OPTIMIZER, Cost())}
                          for r in stages}
    result.records = result.stage_records[min(stages)]
    if watch is not None:
        watch.close()
        result.stack = watch.stack
    if meter is not None:
        result.report = functools.partial(
            meter.report, records=result.stage_records, stage_world=sess.stage_world,
            first_rank=0 if local > 1 else sess.rank % sess.stage_world, stack=result.stack)
        result.memory = result.report(plan)
    return result


def _resume(stages: Mapping[int, StageModel], opts: Mapping[int, torch.optim.Optimizer],
            sess: Session, directory: str) -> int:
    """Load the newest checkpoint into every stage of this process (each its own layers
    and the shared parameters); returns its step."""
    step = 0
    for r, st in stages.items():
        peers = [o.model for q, o in stages.items() if q != r]
        holder = _Holder(st.model, sess.mesh, sess.mode.value, sess.rank, peers=peers)
        step = checkpoint.load(holder, directory, optimizer=opts[r])
    return step


class _AllStages:
    """This process's pipeline stages as one model and one optimizer, for a save: each
    parameter (and its optimizer state) from the first stage that holds it; the stages
    that share a parameter hold equal copies."""

    def __init__(self, stages: Mapping[int, StageModel],
                 opts: Mapping[int, torch.optim.Optimizer]) -> None:
        self.params: dict[str, nn.Parameter] = {}
        self.state: dict[nn.Parameter, dict] = {}
        for r in sorted(stages):
            for name, p in stages[r].model.named_parameters():
                if name not in self.params:
                    self.params[name] = p
                    if p in opts[r].state:
                        self.state[p] = opts[r].state[p]
        self.groups = opts[min(stages)].state_dict()["param_groups"]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.params.items())

    def state_dict(self) -> dict:
        return {"param_groups": self.groups}


def _saving(stages: Mapping[int, StageModel], opts: Mapping[int, torch.optim.Optimizer],
            sess: Session) -> tuple[_Holder, object]:
    """What :func:`checkpoint.save` writes: in run mode this process's stage, as
    :class:`lowering.Parallel` saves it; in simulate mode every stage at once."""
    if len(stages) == 1:
        (r, st), = stages.items()
        return _Holder(st.model, sess.mesh, sess.mode.value, sess.rank), opts[r]
    view = _AllStages(stages, opts)
    return _Holder(view, sess.mesh, sess.mode.value, sess.rank), view  # type: ignore[arg-type]


def _stage_grads(stages: Mapping[int, StageModel], local: int, sess: Session
                 ) -> dict[str, list[torch.Tensor | None]]:
    """name -> one entry per rank (None where that rank's stage does not hold it)."""
    world = local * sess.mesh.pp if sess.mode is Mode.SIMULATE else 1
    out: dict[str, list[torch.Tensor | None]] = {}
    for r, st in stages.items():
        for name, p in st.model.named_parameters():
            if p.grad is None:
                continue
            slot = out.setdefault(name, [None] * world)
            for i, v in enumerate(_values(p.grad, local)):
                slot[r * local + i if world > 1 else 0] = v
    return out


def _pipeline_losses(losses: list[torch.Tensor], m: int, local: int, sess: Session) -> list[float]:
    """The step's loss (mean over microbatches) for every rank; in run mode the last
    stage's value, broadcast over pp."""
    if sess.mode is not Mode.RUN:
        mean = [sum(float(_values(x, local)[i]) for x in losses) / m for i in range(local)]
        return [mean[g % local] for g in range(sess.mesh.size)]
    value = sum(float(_values(x, 1)[0]) for x in losses) / m if losses else 0.0
    t = torch.tensor([value], dtype=torch.float64, device=sess.device)
    pp, s = sess.mesh.pp, sess.stage_world
    src = sess.rank % s + (pp - 1) * s
    dist.broadcast(t, src=src, group=sess.pp_group)
    return [float(t.item())]


def _measured_bubble(slots: list[Slot], pp: int, sess: Session) -> float:
    """Idle fraction of the pipeline from every pp rank's compute timestamps."""
    gathered: list[list] = [[] for _ in range(pp)]
    dist.all_gather_object(gathered, slots, group=sess.pp_group)
    return bubble_of([s for part in gathered for s in part], pp)
