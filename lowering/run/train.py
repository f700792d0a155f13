"""One training loop for every mode: next-token cross-entropy, AdamW, recorded step.

The loop is the same for the single-device reference (no mesh), dry mode (meta
tensors, one traced step), simulate mode (every rank in this process) and run mode (one
rank per process); only the session differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import host_values, implicit_replication, rank_values
from lowering.parallel import DTensorContext, distribute_model, read_whole_weights
from lowering.parallel.data import install_grad_sync
from lowering.parallel.fsdp import compute_dtype, install_at_use
from lowering.parallel.tensor import LocalOps, logits_of, loss_scope, next_token_loss
from lowering.plan import Memory, Plan, StackCost, grad_buckets, microbatch_rows
from lowering.run import checkpoint
from lowering.run.guard import CheckMode, CollectiveGuard
from lowering.run.memory import MemoryMeter
from lowering.run.stack_watch import StackWatch
from lowering.run.session import Mode, Session, group_axes
from lowering.schedule import Cost, Phase, Record, Recorder
from models.datasets import Batches

__all__ = ["TrainConfig", "Checkpointing", "TrainResult", "StepCallback", "Step", "train",
           "reference"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1
    batch: int = 8
    seq: int = 32
    lr: float = 3e-3          # AdamW; gpt-tiny learns the synthetic task in ~50 steps
    seed: int = 0             # model init and data
    keep_grads: bool = False  # keep step 0's full gradients (for --check)
    microbatches: int = 1     # the single-device reference accumulates over these
    check_collectives: CheckMode = CheckMode.FIRST  # run mode: which steps are checked
    batch_ways: int = 1       # (how a pipeline splits the batch: see microbatch_rows)
    vocab: int | None = None  # the data's vocabulary, checked against the logits
    precision: str = "fp32"   # the single-device reference casts as the layout does
    checkpoint: Checkpointing | None = None  # --checkpoint DIR --save-every N --resume
    memory: bool = False      # count step 0's bytes per rank (lowering.run.memory)


@dataclass(frozen=True)
class Checkpointing:
    """Where the built-in loop saves (``DIR/step-NNNNN`` every ``save_every`` steps) and
    whether it resumes from the newest complete checkpoint there."""

    directory: str
    save_every: int = 0
    resume: bool = False

    def due(self, step: int) -> str | None:
        """Where to save after 0-based ``step`` (None: no save then)."""
        done = step + 1
        return f"{self.directory}/step-{done:05d}" if self.save_every and \
            done % self.save_every == 0 else None


@dataclass
class _Holder:
    """What :mod:`.checkpoint` needs of the loop (a :class:`lowering.Parallel` has it too)."""

    model: nn.Module
    mesh: sl.Mesh
    mode: str
    rank: int
    recorder: Recorder | None = None
    checkpoint_extra: dict = field(default_factory=dict)
    peers: list[nn.Module] = field(default_factory=list)  # this process's other stages


@dataclass
class TrainResult:
    losses: list[list[float]] = field(default_factory=list)  # [step][rank]
    records: list[Record] = field(default_factory=list)      # step 0, in issue order
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per rank
    metrics: list[dict[str, object]] = field(default_factory=list)  # [step] name -> rank 0's value
    stage_records: dict[int, list[Record]] = field(default_factory=dict)  # pp coordinate -> step 0
    bubble: list[float] = field(default_factory=list)  # run mode, pp > 1: measured, per step
    rank_records: dict[int, list[Record]] = field(default_factory=dict)  # run mode: every rank
    seconds: list[float] = field(default_factory=list)  # wall clock per step (this process)
    memory: dict[int, Memory] = field(default_factory=dict)  # cfg.memory: global rank -> bytes
    #: dry mode with cfg.memory: pp coordinate -> (F/B/O, chunk) -> one microbatch's compute
    compute: dict[int, dict[tuple[str, int], Cost]] = field(default_factory=dict)
    #: likewise: pp coordinate -> chunk -> the layer stack's forward (for recompute)
    stack: dict[int, dict[int, StackCost]] = field(default_factory=dict)
    #: dry mode with cfg.memory: the memory report for a plan (another recompute mode of
    #: the same trace: the trace does not depend on it, only the report does)
    report: Callable[[Plan], dict[int, Memory]] | None = None


def _values(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return rank_values(full.detach(), world)


def build_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


@dataclass(frozen=True)
class Step:
    """What one finished training step reports (rank 0's wall clock)."""

    index: int                     # 0-based
    losses: list[float]            # every rank's loss (run mode: this rank's)
    metrics: dict[str, object]     # sl.metric values (rank 0's)
    seconds: float                 # wall-clock time of the step on this process
    tokens: int                    # tokens in the global batch


StepCallback = Callable[[Step], None]


def train(model: nn.Module, plan: Plan | None, sess: Session | None, data: Batches,
          cfg: TrainConfig, *, on_step: StepCallback | None = None) -> TrainResult:
    """Train ``model`` under ``plan`` in ``sess`` (both None: the single-device reference)."""
    dmesh = sess.dmesh if sess else None
    # run mode: this process holds one rank's values; simulate: every rank's
    world = sess.world if sess and sess.mode is Mode.SIMULATE else 1
    dry = sess is not None and sess.mode is Mode.DRY
    recorder = _guarded(Recorder(group_axes(sess)), sess, cfg) if sess else None
    if recorder is not None:
        recorder.count_compute = dry and cfg.memory
    ctx = None
    live: list[Recorder | None] = [recorder]  # the running step's recorder, for the grad hooks
    if dmesh is None:
        read_whole_weights(model)
    if plan is not None and dmesh is not None:
        distribute_model(model, plan, dmesh)
        install_grad_sync(model, dmesh, lambda: live[0], grad_buckets(plan, model))
        ctx = DTensorContext(plan, dmesh, recorder)
    elif plan is None:
        install_at_use(model, None, None, dtype=compute_dtype(cfg.precision))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=True)
    meter = MemoryMeter({0: model}, ranks=world, dry=dry) if cfg.memory and sess else None
    watch = (StackWatch.of_model(model, meter, recorder)
             if meter is not None and recorder is not None and recorder.count_compute else None)
    result = TrainResult()
    ck = cfg.checkpoint if not dry else None
    holder = _Holder(model, sess.mesh if sess else sl.Mesh(), _mode_name(sess),
                     sess.rank if sess else 0)
    first = checkpoint.load(holder, ck.directory, optimizer=opt) if ck and ck.resume else 0
    for step in range(first, cfg.steps):
        t0 = time.perf_counter()
        idx, tgt = _batch(data, step, cfg, ctx, dry=dry)
        rec = recorder if step == 0 else _checker(sess, cfg, ctx)
        live[0] = rec
        m = meter if step == first else None
        with _recording(rec), _active(ctx, rec):
            if ctx is not None:
                idx = ctx.constrain(idx, ("batch", "seq"))
                tgt = ctx.constrain(tgt, ("batch", "seq"))
            if plan is None and cfg.microbatches > 1:
                loss, reported = _accumulate(model, idx, tgt, cfg)
            else:
                loss, reported = _forward_backward(model, idx, tgt, cfg, rec, m)
        if m is not None:
            m.after_backward()
        if step == 0 and cfg.keep_grads and not dry:
            result.grads = {n: _values(p.grad, world) for n, p in model.named_parameters()
                            if p.grad is not None}
        with _recording(rec), (rec.site("optimizer", Phase.OPTIMIZER) if rec else _null()):
            opt.step()
            if m is not None:
                m.after_optimizer(opt)
            opt.zero_grad(set_to_none=True)
        if not dry:
            losses = [float(v) for v in _values(loss, world)]
            metrics = {k: _values(v, world)[0].tolist() for k, v in reported.metrics.items()}
            _finish(result, step, losses, metrics, t0, cfg, on_step)
        if ck and (path := ck.due(step)):
            checkpoint.save(holder, path, step=step + 1, optimizer=opt)
    if recorder is not None:
        result.records = recorder.records
        if recorder.count_compute:
            c = recorder.compute
            result.compute = {0: {("F", 0): c.get(Phase.FORWARD, Cost()),
                                  ("B", 0): c.get(Phase.BACKWARD, Cost()),
                                  ("O", 0): c.get(Phase.OPTIMIZER, Cost())}}
    if watch is not None:
        watch.close()
        result.stack = watch.stack
    if meter is not None and sess is not None:
        first, records = 0 if world > 1 else sess.rank % sess.stage_world, {0: result.records}
        result.report = functools.partial(meter.report, records=records, first_rank=first,
                                          stage_world=sess.stage_world, stack=result.stack)
        result.memory = result.report(plan)
    return result


def _mode_name(sess: Session | None) -> str:
    return "single" if sess is None else sess.mode.value


def _batch(data: Batches, step: int, cfg: TrainConfig, ctx: DTensorContext | None, *,
           dry: bool, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch, the same on every rank, in the layout's token order
    (load-balanced sequence sharding reorders tokens; a pipeline reorders rows)."""
    with host_values():
        idx, tgt = data.batch(step, cfg.batch, cfg.seq)
        if ctx is not None:
            order = ctx.positions(idx.shape[1], None)
            idx, tgt = idx[:, order], tgt[:, order]
        if rows is not None:
            idx, tgt = idx[rows], tgt[rows]
    if dry:
        return idx.to("meta"), tgt.to("meta")
    return idx, tgt


def _forward_backward(model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor, cfg: TrainConfig,
                      rec: Recorder | None, meter: MemoryMeter | None = None
                      ) -> tuple[torch.Tensor, sl.Collected]:
    with (meter.saving() if meter else _null()):
        with sl.collecting() as reported:
            logits = logits_of(model(idx))
        with loss_scope(logits), (rec.site("loss") if rec else _null()):
            loss = next_token_loss(logits, tgt, vocab=cfg.vocab)
            aux = reported.total_aux()
            total = loss if aux is None else loss + aux
    if meter is not None:
        meter.sample()
    with loss_scope(logits):
        total.backward()
    return loss, reported


def _finish(result: TrainResult, step: int, losses: list[float], metrics: dict[str, object],
            t0: float, cfg: TrainConfig, on_step: StepCallback | None) -> None:
    result.losses.append(losses)
    result.metrics.append(metrics)
    seconds = time.perf_counter() - t0
    result.seconds.append(seconds)
    if on_step:
        on_step(Step(step, losses, metrics, seconds, cfg.batch * cfg.seq))


def _guarded(rec: Recorder, sess: Session, cfg: TrainConfig) -> Recorder:
    """Run mode: check each collective across its group before issuing it."""
    if sess.mode is Mode.RUN and cfg.check_collectives is not CheckMode.OFF:
        rec.guard = CollectiveGuard(sess.rank)
    return rec


def _checker(sess: Session | None, cfg: TrainConfig, ctx: DTensorContext | None
             ) -> Recorder | None:
    """After step 0: a throwaway recorder that only checks ("all"), else nothing."""
    if sess is None or sess.mode is not Mode.RUN or cfg.check_collectives is not CheckMode.ALL:
        return None
    rec = _guarded(Recorder(group_axes(sess)), sess, cfg)
    if ctx is not None:
        ctx.recorder = rec
    return rec


def reference(factory: Callable[[], nn.Module], data: Batches, cfg: TrainConfig) -> TrainResult:
    """The single-device run every layout must match (with ``cfg.microbatches`` > 1, the
    pipeline's microbatches one after another, gradients accumulated)."""
    cfg = dataclasses.replace(cfg, checkpoint=None)  # the reference neither saves nor loads
    return train(build_model(factory, cfg.seed), None, None, data, cfg)


def _accumulate(model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor,
                cfg: TrainConfig) -> tuple[torch.Tensor, sl.Collected]:
    """One device, the pipeline's microbatches in turn: mean loss, summed gradients / m."""
    rows = microbatch_rows(idx.shape[0], cfg.batch_ways, cfg.microbatches)
    m = cfg.microbatches
    losses, last = [], sl.Collected()
    for x, y in zip(idx[rows].chunk(m), tgt[rows].chunk(m)):
        with sl.collecting() as last:
            logits = logits_of(model(x))
        loss = next_token_loss(logits, y, vocab=cfg.vocab)
        aux = last.total_aux()
        (loss if aux is None else loss + aux).backward()
        losses.append(loss.detach())
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(m)
    return sum(losses) / m, last  # type: ignore[return-value]


@contextlib.contextmanager
def _recording(rec: Recorder | None) -> Iterator[None]:
    if rec is None:
        yield
        return
    with rec.recording():
        yield


@contextlib.contextmanager
def _active(ctx: DTensorContext | None, rec: Recorder | None) -> Iterator[None]:
    if ctx is None:
        yield
        return
    where = rec.current_site if rec is not None else (lambda: "the model")
    with sl.activate(ctx), implicit_replication(), LocalOps(where):
        yield


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield
