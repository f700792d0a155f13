"""A user's loop on a pipelined mesh (pp > 1): :meth:`lowering.Parallel.step` runs one
pipeline schedule over a global batch.

A pipeline step cannot be one ``model(x)`` and one ``loss.backward()``: the schedule
interleaves the forwards and backwards of its microbatches across the stages. So the
user hands the batch, its target and the loss over, and the rest of the loop (optimizer,
scheduler, clipping, checkpoints) stays plain PyTorch::

    loss = par.step(x, y, loss_fn)        # forward + backward of every microbatch
    par.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()

The loss of the step is the mean of ``loss_fn`` over the microbatches (equal to the
whole batch's when ``loss_fn`` is a mean over rows, as every torch loss by default is).

Run mode: this process's stage under ``torch.distributed.pipelining``. Simulate mode:
every pipeline rank's actions run in schedule order in this process over the *one* model
the user's optimizer holds (each stage runs only its own layers), so the stages' shared
parameters (embeddings, head) collect every stage's gradient by themselves; each
pipeline rank still records the dp reductions and the pp sums its own process would issue.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import nn

import shardlang as sl
from lowering._torch import host_values
from lowering.parallel import DTensorContext, distribute_model, read_whole_weights
from lowering.parallel.data import reduce_grad
from lowering.parallel.pipeline import StageModel, sum_shared_grads
from lowering.parallel.pipeline_step import (LossFn, funcol_all_reduce, reduce_grads,
                                             step_in_process, step_torch)
from lowering.plan import Plan, microbatch_rows
from lowering.run.session import Mode, Session, group_axes
from lowering.run.pipeline_loop import _pipeline_losses
from lowering.run.train import _active, _recording
from lowering.schedule import Op, Phase, Record, Recorder

__all__ = ["PipelinedStep"]


class PipelinedStep:
    """The pipeline stages of this process over ``model`` and their recorders."""

    def __init__(self, model: nn.Module, plan: Plan, sess: Session) -> None:
        if plan.pipeline is None:
            raise sl.ShardingError(
                f"a pipelined step needs a plan with pp > 1, got {plan.mesh!r}; drive a "
                "layout without pp by model(x) and loss.backward()")
        self.model, self.plan, self.sess = model, plan, sess
        self.pipe = plan.pipeline.pipe
        self.run = sess.mode is Mode.RUN
        mine = [sess.rank // sess.stage_world] if self.run else list(range(self.pipe.pp))
        self.stages = {r: StageModel(model, plan, plan.pipeline, r, keep=not self.run)
                       for r in mine}
        if sess.dmesh is not None:
            distribute_model(model, plan, sess.dmesh)
        else:
            read_whole_weights(model)
        for st in self.stages.values():
            st.dmesh = sess.dmesh
        self.recs = {r: Recorder(group_axes(sess)) for r in mine}
        self.ctxs = {r: DTensorContext(plan, sess.dmesh, self.recs[r])
                     if sess.dmesh is not None else None for r in mine}
        self._block: tuple[list[int], torch.dtype] | None = None
        self._current: int | None = None
        self._touched: dict[int, set[str]] = {r: set() for r in mine}
        self.inside = False
        if not self.run:
            for name, p in model.named_parameters():
                p.register_post_accumulate_grad_hook(self._touch(name))

    def _touch(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self._current is not None:
                self._touched[self._current].add(name)
        return hook

    @property
    def first(self) -> int:
        return min(self.stages)

    def constrain(self, r: int) -> Callable[[torch.Tensor, sl.Axes], torch.Tensor]:
        ctx = self.ctxs[r]
        return ctx.constrain if ctx is not None else (lambda x, axes: x)

    @contextlib.contextmanager
    def active(self, r: int) -> Iterator[None]:
        self._current = r
        try:
            with _recording(self.recs[r]), _active(self.ctxs[r], self.recs[r]):
                yield
        finally:
            self._current = None

    # -- one step ---------------------------------------------------------------
    def step(self, inputs: torch.Tensor, target: torch.Tensor, loss_fn: LossFn) -> float:
        """Forward and backward of every microbatch of the global ``inputs``; gradients
        reduced to their placements and summed over pp. Returns the step's loss."""
        m, ways = self.pipe.microbatches, self.plan.batch_ways
        n = inputs.shape[0]
        if n % (m * ways) or target.shape[0] != n:
            raise sl.ShardingError(
                f"par.step got a batch of {n} rows (target {target.shape[0]}) on "
                f"{self.plan.mesh!r}: the pipeline splits it into {m} microbatches, each "
                f"split {ways} ways over the batch axes, so give a multiple of {m * ways} "
                "rows, the same for inputs and target")
        rows = microbatch_rows(n, ways, m)
        with host_values():
            inputs, target = inputs.index_select(0, rows), target.index_select(0, rows)
        device = self.sess.device
        if device != "cpu":
            inputs, target = inputs.to(device), target.to(device)
        shape, dtype = (n // m, *inputs.shape[1:]), inputs.dtype

        def tokens() -> torch.Tensor:  # the input of a chunk that is not the first
            with host_values():
                return torch.zeros(shape, dtype=dtype, device=device)

        self.inside = True
        try:
            losses = self._run(inputs, target, loss_fn, tokens) if self.run else \
                self._simulate(inputs, target, loss_fn, tokens)
        finally:
            self.inside = False
        with self.recs[self.first].paused():  # reading the loss is not part of the step
            return _pipeline_losses(losses, m, 1 if self.run else self.sess.stage_world,
                                    self.sess)[0]

    def _run(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
             tokens: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        (r, st), = self.stages.items()
        rec, con = self.recs[r], self.constrain(r)
        if self._block is None:
            self._block = self._probe(st, x, tokens)
        out = step_torch(st, self.ctxs[r], rec, self.pipe, x, y, self.sess.pp_group,
                         torch.device(self.sess.device), tokens, con, loss=loss_fn,
                         block=self._block)
        reduce_grads(st, self.pipe, rec)
        sum_shared_grads(st, funcol_all_reduce(self.sess.pp_group), rec)
        return out.losses

    def _probe(self, st: StageModel, x: torch.Tensor, tokens: Callable[[], torch.Tensor]
               ) -> tuple[list[int], torch.dtype]:
        """This rank's block of the hidden state between chunks (torch's stages take
        static shapes): the first stage runs chunk 0 once without autograd and without
        recording, and tells the others."""
        import torch.distributed as dist
        got: list[object] = [None]
        if 0 in st.chunks:
            rec = self.recs[st.pp_rank]
            with torch.no_grad(), torch.random.fork_rng(devices=[]), rec.paused():
                mb = x[: x.shape[0] // self.pipe.microbatches]
                h = st.forward(0, mb, tokens=tokens, constrain=self.constrain(st.pp_rank)).out
            got = [(list(h.shape), h.dtype)]
        src = self.sess.rank % self.sess.stage_world  # pp coordinate 0, same local rank
        dist.broadcast_object_list(got, src=src, group=self.sess.pp_group)
        return got[0]  # type: ignore[return-value]

    def _simulate(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                  tokens: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        m = self.pipe.microbatches
        for r in self.stages:
            self._touched[r] = set()
        out = step_in_process(self.stages, {r: self.constrain(r) for r in self.stages},
                              self.recs, self.pipe, list(x.chunk(m)), list(y.chunk(m)),
                              self.active, tokens, loss=loss_fn)
        self._current = None
        for p in self.model.parameters():  # the loss is a mean over microbatches
            if p.grad is not None:
                p.grad.div_(m)
        self._reduce_in_process()
        return out.losses

    def _reduce_in_process(self) -> None:
        """Each pipeline rank's dp reductions (each gradient reduced once; a stage that
        shares it records the same collectives), then its pp sums of shared gradients
        (already summed: every stage accumulated into the one parameter)."""
        params = list(reversed(list(self.model.named_parameters())))
        done: dict[str, list[Record]] = {}
        for r, st in self.stages.items():
            rec = self.recs[r]
            with self.active(r):
                for name, p in params:
                    if name not in self._touched[r] or not st.holds(name):
                        continue
                    if name in done:
                        for x in done[name]:
                            rec.add(dataclasses.replace(x, index=len(rec.records)))
                        continue
                    start = len(rec.records)
                    g = p.grad
                    if (self.sess.dmesh is not None and g is not None
                            and hasattr(g, "placements")
                            and tuple(g.placements) != tuple(p.placements)):
                        with rec.site(name, Phase.BACKWARD):
                            p.grad = reduce_grad(g, self.sess.dmesh, p.placements)
                    done[name] = rec.records[start:]
                for name, p in self.model.named_parameters():
                    if not st.is_shared(name):
                        continue
                    t = p.grad if p.grad is not None else p
                    local = t.to_local() if hasattr(t, "to_local") else t
                    rec.add(Record(
                        index=len(rec.records), phase=Phase.BACKWARD,
                        site=f"{name} (held by every pipeline stage)", op=Op.ALL_REDUCE,
                        axis="pp", shape=tuple(local.shape),
                        dtype=str(local.dtype).removeprefix("torch."),
                        bytes=local.numel() * local.element_size(), group_size=self.pipe.pp))
