"""Your own training loop: :func:`parallelize` distributes an annotated model in place and
returns a :class:`Parallel`; a plain PyTorch loop then trains it unchanged.

The same script runs three ways. Under torchrun (``shardlang run SCRIPT.py --mesh M``)
each process is one rank (gloo on CPUs, nccl on GPUs). Under plain ``python`` (or
``shardlang simulate SCRIPT.py --mesh M``) with a mesh of more than one rank, every rank
runs in this process, so :meth:`Parallel.values` shows each rank's value. With a mesh of
one rank the model runs as it is (the single-device reference, with the same casts).

What happens without an extra call: ``loss.backward()`` reduces each gradient over the
mesh as soon as autograd has accumulated it (hooks, while the rest of the backward still
runs; FSDP reduce-scatters in the gather's backward); ``loss.item()`` of a loss that is
a partial sum per rank returns the global value; ``F.cross_entropy`` on logits whose
vocabulary is sharded runs vocab-parallel; every collective is recorded, and the last
finished step's schedule is :meth:`Parallel.schedule`. A step ends when any optimizer
steps.

Example:
    >>> import torch, shardlang as sl, lowering, models                   # doctest: +SKIP
    >>> par = lowering.parallelize(models.GPT(models.GPTConfig()), sl.Mesh(dp=2, tp=2))
    >>> opt = torch.optim.AdamW(par.model.parameters(), lr=1e-3)
    >>> x = par.shard(torch.randint(0, 256, (8, 32)))
    >>> loss = par.model(x).float().logsumexp(-1).mean(); loss.backward(); opt.step()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import (dtensor_op_handlers, host_values, implicit_replication,
                             optimizer_step_hooks, rank_values)
from lowering.parallel import DTensorContext, distribute_model, read_whole_weights
from lowering.parallel.data import GradSync, install_grad_sync
from lowering.parallel.fsdp import compute_dtype, install_at_use
from lowering.parallel.tensor import LocalOps
from lowering.plan import Options, Plan, grad_buckets, lower
from lowering.run.guard import CollectiveGuard
from lowering.run.launch import report_worker_error
from lowering.run.pipelined import PipelinedStep
from lowering.run.values import clip_grad_norm, from_blocks, global_item
from lowering.run.session import (Mode, Session, group_axes, let_backend_threads_finish,
                                  session, under_torchrun)
from lowering.run import checkpoint
from lowering.schedule import Phase, Record, Recorder, totals

__all__ = ["parallelize", "Parallel", "MESH_ENV", "launcher_mesh"]

#: Set by ``shardlang run|simulate SCRIPT.py --mesh M``: the mesh ``parallelize(mesh=None)`` takes.
MESH_ENV = "SHARDLANG_MESH"
_ACTIVE: list[Parallel] = []


def launcher_mesh() -> sl.Mesh | None:
    """The mesh the launcher passed (``--mesh``), if any."""
    spec = os.environ.get(MESH_ENV)
    return sl.Mesh.parse(spec) if spec else None


def parallelize(model: nn.Module, mesh: sl.Mesh | str | None = None,
                rules: sl.Rules | str | None = None, *, fsdp: bool = False,
                precision: str = "fp32", load_balance: bool = False,
                schedule: str | None = None, microbatches: int | None = None,
                virtual: int | None = None, bucket_kb: int | None = None) -> Parallel:
    """Distribute an annotated ``model`` over ``mesh`` in place and return its
    :class:`Parallel` (``mesh=None``: the mesh ``shardlang run|simulate --mesh`` passed).
    Gradients are all-reduced in buckets of ``bucket_kb`` KiB (None: DDP's sizes; 0: one
    all-reduce per parameter) while backward runs.

    Example:
        >>> import shardlang as sl, lowering, models
        >>> par = lowering.parallelize(models.GPT(models.GPTConfig()), sl.Mesh())
        >>> par.mode
        'single'
        >>> par.close()
    """
    if _ACTIVE:
        raise sl.ShardingError(
            f"parallelize() was called twice in this process (the first for "
            f"{type(_ACTIVE[0].model).__name__} on {_ACTIVE[0].mesh!r}); one process runs one "
            "parallel model: keep the first Parallel, or call its .close() before "
            "parallelizing another model")
    if not isinstance(model, nn.Module):
        raise sl.ShardingError(
            f"parallelize() takes the annotated nn.Module, got {type(model).__name__}")
    mesh = _mesh_of(mesh)
    rules = rules if isinstance(rules, sl.Rules) else \
        sl.Rules.parse(rules or "", base=sl.Rules.default())
    options = Options.of(fsdp=fsdp, precision=precision, load_balance=load_balance,
                         schedule=schedule, microbatches=microbatches, virtual=virtual,
                         bucket_kb=bucket_kb)
    return Parallel(model, lower(model, mesh, rules, options=options))


def _mesh_of(mesh: sl.Mesh | str | None) -> sl.Mesh:
    if isinstance(mesh, sl.Mesh):
        return mesh
    if isinstance(mesh, str):
        return sl.Mesh.parse(mesh) if mesh.strip() else sl.Mesh()  # "": one device
    given = launcher_mesh()
    if given is not None:
        return given
    if under_torchrun():
        raise sl.ShardingError(
            "parallelize(mesh=None) under torchrun, but no mesh was passed: give "
            "mesh=sl.Mesh(...) or launch with 'shardlang run SCRIPT.py --mesh dp=2,...'")
    return sl.Mesh()


class Parallel:
    """An annotated model distributed over a mesh, and what a training loop needs of it.

    ``mode`` is ``"run"`` (one rank per process), ``"simulate"`` (every rank in this
    process) or ``"single"`` (a mesh of one rank: the model as it is).
    """

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model, self.plan, self.mesh = model, plan, plan.mesh
        self._stack = contextlib.ExitStack()
        self._last: list[Record] = []
        self._stage_last: dict[int, list[Record]] = {}
        self._pipe: PipelinedStep | None = None
        self._steps = 0
        _ACTIVE.append(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    # -- setting up -----------------------------------------------------------
    def _start(self) -> None:
        plan, stack = self.plan, self._stack
        dtype = compute_dtype(str(plan.options.precision))
        if self.mesh.size == 1 and not under_torchrun():
            self.mode, self.rank, self.sess = "single", 0, None
            self.recorder: Recorder | None = None
            self._sync: GradSync | None = None
            self.ctx: DTensorContext | None = None
            install_at_use(self.model, None, None, dtype=dtype)
            return
        mode = Mode.RUN if under_torchrun() else Mode.SIMULATE
        sess: Session = stack.enter_context(session(self.mesh, mode))
        self.mode, self.rank, self.sess = mode.value, sess.rank, sess
        if sess.device != "cpu":
            self.model.to(sess.device)
        rec = Recorder(group_axes(sess))
        if mode is Mode.RUN:
            rec.guard = CollectiveGuard(sess.rank)  # the first step is checked across groups
        self.recorder = rec
        if self.mesh.pp > 1:
            self._start_pipeline(sess, mode, dtype)
            return
        if sess.dmesh is None:  # torchrun with one process: one device, in a process group
            self.ctx = self._sync = None
            read_whole_weights(self.model)
            install_at_use(self.model, None, None, dtype=dtype)
            return
        distribute_model(self.model, plan, sess.dmesh)
        self._sync = install_grad_sync(self.model, sess.dmesh, lambda: self.recorder,
                                       grad_buckets(plan, self.model))
        self.ctx = DTensorContext(plan, sess.dmesh, rec)
        stack.enter_context(rec.recording())
        stack.enter_context(sl.activate(self.ctx))
        stack.enter_context(implicit_replication())
        stack.enter_context(LocalOps(rec.current_site))
        stack.enter_context(dtensor_op_handlers(item=lambda t: global_item(t, rec)))
        stack.enter_context(optimizer_step_hooks(before=self._step_starts, after=self._step_done))

    def _start_pipeline(self, sess: Session, mode: Mode, dtype: torch.dtype | None) -> None:
        """pp > 1: the stages of this process; :meth:`step` drives them."""
        pipe = self._pipe = PipelinedStep(self.model, self.plan, sess)
        self._sync = None
        self.recorder = pipe.recs[pipe.first]
        stack = self._stack
        if mode is Mode.RUN:
            self.recorder.guard = CollectiveGuard(sess.rank)
            self.ctx = pipe.ctxs[pipe.first]
            stack.enter_context(pipe.active(pipe.first))
            pipe._current = None
        else:  # every stage's contexts are entered around its own actions
            self.ctx = None
            stack.enter_context(LocalOps(self.recorder.current_site))  # the loop's own ops
        stack.enter_context(implicit_replication())
        stack.enter_context(dtensor_op_handlers(item=lambda t: global_item(t, self.recorder)))
        stack.enter_context(optimizer_step_hooks(before=self._step_starts, after=self._step_done))

        def outside(mod: nn.Module, args: tuple) -> None:
            if not pipe.inside:
                raise sl.ShardingError(
                    f"par.model(...) on the pipelined {self.mesh!r}: a pipeline's forward "
                    "and backward interleave over microbatches and stages, so one call "
                    "cannot run them; use loss = par.step(inputs, target, loss_fn) "
                    "(forward and backward of the whole batch), then opt.step()")
        stack.callback(self.model.register_forward_pre_hook(outside).remove)

    def step(self, inputs: torch.Tensor, target: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Forward and backward of the global batch ``inputs`` (the same on every rank):
        ``loss_fn(model output, target)`` per microbatch, gradients synchronised. Returns
        the step's loss, the mean over microbatches (a detached scalar). On a pipelined
        mesh this is how a loop drives a step; on any other it is ``loss_fn(model(x),
        y).backward()`` with the inputs sharded."""
        if not callable(loss_fn):
            raise sl.ShardingError(
                f"par.step(inputs, target, loss_fn): loss_fn must be callable (output, "
                f"target) -> loss, got {type(loss_fn).__name__}")
        if self.mesh.pp > 1 and self.sess is not None:
            return torch.tensor(self._pipe.step(inputs, target, loss_fn))
        loss = loss_fn(self.model(self.shard(inputs)), self.shard(target))
        loss.backward()
        return torch.tensor(float(loss.item()))

    def _step_starts(self) -> None:
        if self.recorder is not None:  # the optimizer's collectives, if any, are its own phase
            self._in_step = self.recorder.site("optimizer", Phase.OPTIMIZER)
            self._in_step.__enter__()

    def _step_done(self) -> None:
        rec = self.recorder
        if rec is not None:
            self._in_step.__exit__(None, None, None)
            rec.guard = None
        if self._pipe is not None:  # every pipeline rank's recorder of this process
            self._stage_last = {r: r_rec.records for r, r_rec in self._pipe.recs.items()}
            for r_rec in self._pipe.recs.values():
                r_rec.records = []
            self._last = self._stage_last[self._pipe.first]
        elif rec is not None:
            self._last, rec.records = rec.records, []
        self._steps += 1

    # -- inputs -----------------------------------------------------------------
    def _axes(self, x: torch.Tensor, axes: Sequence[sl.Axis]) -> sl.Axes:
        if axes:
            if len(axes) != x.dim():
                raise sl.ShardingError(
                    f"{len(axes)} logical axes {tuple(axes)} for a tensor of shape "
                    f"{tuple(x.shape)}: give one per dim (None for a dim that is not split)")
            return tuple(axes)
        return (("batch", "seq") + (None,) * x.dim())[:x.dim()]

    def shard(self, x: torch.Tensor, *axes: sl.Axis) -> torch.Tensor:
        """The global ``x`` (the same on every rank) as this layout splits it: each rank
        keeps its block (default axes: ``batch``, ``seq``, then unsplit dims)."""
        names = self._axes(x, axes)
        if self.ctx is None or self.mesh.pp > 1:  # par.step lays a pipeline's batch out
            return x
        if self.sess is not None and self.sess.device != "cpu":
            x = x.to(self.sess.device)
        if self.plan.options.load_balance and "seq" in names:
            d = names.index("seq")  # load-balanced causal order: rank r holds chunks r, 2n-1-r
            with host_values():
                x = x.index_select(d, self.ctx.positions(x.shape[d], x.device))
        return self.ctx.constrain(x, names)

    def from_local(self, x: torch.Tensor, *axes: sl.Axis) -> torch.Tensor:
        """Each rank's own block ``x`` (each dp rank its own rows) as one global tensor; the
        blocks of ranks that the axes do not split must be equal."""
        names = self._axes(x, axes)
        if self.mesh.pp > 1 and self.sess is not None:
            raise sl.ShardingError(
                f"par.from_local on the pipelined {self.mesh!r}: par.step takes the global "
                "batch (the same on every rank) and splits it into microbatches; gather "
                "the rows first, or give the same global batch to every rank")
        if self.ctx is None:
            return x
        return from_blocks(self.ctx, x, names)

    # -- reading values -----------------------------------------------------------
    def values(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's local value of ``t`` (one per rank; in run mode this rank's only)."""
        local = t.to_local() if isinstance(t, DTensor) else t
        world = (self.sess.stage_world if self.mesh.pp > 1 else self.mesh.size) \
            if self.mode == "simulate" and self.sess is not None else 1
        return [v.detach() for v in rank_values(local, world)]

    def schedule(self, rank: int | None = None) -> list[Record]:
        """The collectives of the last finished step (an optimizer step ends one) on
        ``rank`` (default: this process's), in issue order; before the first, those
        recorded so far. In simulate mode any rank's; in run mode this process's only."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.mesh.size or (self.mode == "run" and rank != self.rank):
            raise sl.ShardingError(
                f"par.schedule(rank={rank}) on {self.mesh!r} in {self.mode} mode: "
                + (f"this process is rank {self.rank} and records its own schedule only; "
                   "gather the others' or run the script under 'shardlang simulate'"
                   if self.mode == "run" else f"ranks are 0..{self.mesh.size - 1}"))
        if self._pipe is not None and self.sess is not None and self.mode == "simulate":
            stage = rank // self.sess.stage_world
            if self._steps == 0:
                return list(self._pipe.recs[stage].records)
            return list(self._stage_last[stage])
        if self._steps == 0 and self.recorder is not None:
            return list(self.recorder.records)
        return list(self._last)

    def explain(self) -> str:
        """:meth:`schedule` as text, one collective per line, then the totals per mesh
        axis (what ``shardlang explain`` shows for a preset), printed and returned."""
        recs = self.schedule()
        lines = [f"{type(self.model).__name__} on {self.mesh!r}, rank {self.rank}: "
                 f"{len(recs)} collectives in the last step"]
        lines += [f"  {r.index:4d} {r.phase.value:9s} {r.op.value:14s} {r.axis:3s} "
                  f"{str(list(r.shape)):18s} {r.dtype:9s} {r.bytes:>12,d} B  {r.site}"
                  for r in recs]
        for axis, per in totals(recs).get("axis", {}).items():
            lines.append(f"  {axis}: {per['count']:.0f} collectives, {per['bytes']:,.0f} B "
                         f"payload, {per['wire_bytes']:,.0f} B on the wire")
        text = "\n".join(lines)
        print(text)
        return text

    # -- training helpers -------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this block accumulates gradients without reducing them; the
        first backward after it reduces the accumulated sum once (as DDP's ``no_sync``)."""
        if self._sync is None:
            yield
            return
        with self._sync.paused():
            yield

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale every gradient so their global norm (over every mesh axis) is at most
        ``max_norm``; returns the norm before clipping (as ``torch.nn.utils``' does)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.mesh.pp > 1 and self.mode == "run":  # sum over the stages too
            st = self._pipe.stages[self._pipe.first]
            shared = [] if st.pp_rank == 0 else \
                [p for n, p in self.model.named_parameters() if st.is_shared(n)]
            return clip_grad_norm(params, self.sess.dmesh, max_norm, norm_type,
                                  uncounted=shared, pp_group=self.sess.pp_group)
        if self.ctx is None and (self.sess is None or self.sess.dmesh is None):
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        rec = self.recorder
        with (rec.site("clip_grad_norm_", Phase.OPTIMIZER) if rec else contextlib.nullcontext()):
            return clip_grad_norm(params, self.sess.dmesh if self.sess else None, max_norm, norm_type)

    # -- checkpoints ------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, step: int,
             optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
             scheduler: object = None, asynchronous: bool = False) -> None:
        """Write a checkpoint (torch DCP: model, optimizer, step, RNG, ``extra``) to
        ``directory``; it counts as complete only once every rank has written its part."""
        checkpoint.save(self, directory, step=step, optimizer=optimizer, extra=extra, scheduler=scheduler,
             asynchronous=asynchronous)

    def load(self, directory: str | os.PathLike, *,
             optimizer: torch.optim.Optimizer | None = None, scheduler: object = None) -> int:
        """Load the checkpoint in ``directory`` (or the newest complete one under it), on
        this layout whatever layout saved it; returns the step it was saved at."""
        return checkpoint.load(self, directory, optimizer=optimizer, scheduler=scheduler)

    # -- the end --------------------------------------------------------------------
    def close(self, exc: tuple[type[BaseException] | None, BaseException | None,
                               TracebackType | None] = (None, None, None)) -> None:
        """Leave the mesh (tear the process group down); idempotent."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            failed = exc[0] is not None or _FAILED
            self._stack.__exit__(*(exc if exc[0] else
                                   ((RuntimeError, RuntimeError("failed"), None) if failed
                                    else (None, None, None))))
            if self.mode == "run":  # also when the script's own process group lives on
                let_backend_threads_finish()

    def __enter__(self) -> Parallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(exc)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Parallel({type(self.model).__name__}, {self.mesh!r}, mode={self.mode!r})"


_FAILED: list[bool] = []
_hook = sys.excepthook


def _note_failure(kind: type, value: BaseException, tb: TracebackType | None) -> None:
    _FAILED.append(True)  # an uncaught error: tear down without waiting for the peers
    if isinstance(value, sl.ShardingError):
        if not report_worker_error(str(value)):  # a torchrun worker hands it to the launcher
            print(f"error: {value}", file=sys.stderr)
        return
    _hook(kind, value, tb)


sys.excepthook = _note_failure
