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
from collections.abc import Iterator, Sequence
from types import TracebackType

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import (dtensor_op_handlers, host_values, implicit_replication,
                             optimizer_step_hooks, rank_values)
from lowering.parallel import DTensorContext, distribute_model
from lowering.parallel.data import GradSync, install_grad_sync
from lowering.parallel.fsdp import compute_dtype, install_at_use
from lowering.parallel.tensor import LocalOps
from lowering.plan import Options, Plan, grad_buckets, lower
from lowering.run.guard import CollectiveGuard
from lowering.run.launch import report_worker_error
from lowering.run.values import clip_grad_norm, from_blocks, global_item
from lowering.run.session import Mode, Session, group_axes, session, under_torchrun
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
    if mesh.pp > 1:
        raise sl.ShardingError(
            f"parallelize() on {mesh!r}: a user loop does not drive a pipeline yet (pp > 1); "
            f"train pipelines with 'shardlang run MODEL --mesh {mesh}' (the built-in loop), "
            "or drop pp from the mesh")
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
        if sess.dmesh is None:  # torchrun with one process: one device, in a process group
            self.ctx = self._sync = None
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

    def _step_starts(self) -> None:
        if self.recorder is not None:  # the optimizer's collectives, if any, are its own phase
            self._in_step = self.recorder.site("optimizer", Phase.OPTIMIZER)
            self._in_step.__enter__()

    def _step_done(self) -> None:
        rec = self.recorder
        if rec is not None:
            self._in_step.__exit__(None, None, None)
            self._last, rec.records = rec.records, []
            rec.guard = None
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
        if self.ctx is None:
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
        if self.ctx is None:
            return x
        return from_blocks(self.ctx, x, names)

    # -- reading values -----------------------------------------------------------
    def values(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's local value of ``t`` (one per rank; in run mode this rank's only)."""
        local = t.to_local() if isinstance(t, DTensor) else t
        world = self.mesh.size if self.mode == "simulate" else 1
        return [v.detach() for v in rank_values(local, world)]

    def schedule(self) -> list[Record]:
        """The collectives of the last finished step (an optimizer step ends one), in
        issue order; before the first, those recorded so far."""
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
        if self.ctx is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        rec = self.recorder
        with (rec.site("clip_grad_norm_", Phase.OPTIMIZER) if rec else contextlib.nullcontext()):
            return clip_grad_norm(params, self.ctx.dmesh, max_norm, norm_type)

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
