"""One pipelined training step, two executors over the same action orders.

* In process (dry and simulate modes): every pipeline rank's stage model lives in this
  process; their actions run in schedule order, a receive waiting for its send. Sends
  and receives hand each rank's local block over directly (the ranks of one stage and
  the next share their non-``pp`` coordinates, so local rank ``i`` talks to local rank
  ``i``) and are recorded.
* Run mode: torch.distributed.pipelining's ``PipelineStage`` and ``ScheduleGPipe`` /
  ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` over the ``pp`` process group; the
  sends and receives are recorded as the schedule asks the stage for them.

Both then scale gradients by 1/m (the loss is a mean over microbatches), bring them to
their placements (dp/ep/FSDP reduction) and sum the gradients of parameters held by
every stage over ``pp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)
from torch.distributed.tensor import DTensor, Shard

import shardlang as sl
from lowering._torch import all_reduce_sum, host_values, instrument_pipeline_stage
from lowering.parallel.context import DTensorContext
from lowering.parallel.data import sync_grads
from lowering.parallel.pipeline import Chunk, StageModel, p2p_record
from lowering.parallel.tensor import loss_parallel_needed, loss_scope, next_token_loss
from lowering.plan import Action, Kind, Pipe, Schedule, Slot, actions
from lowering.schedule import Cost, Op, Phase, Record, Recorder

__all__ = ["StepOut", "LossFn", "default_axes", "step_in_process", "step_torch", "reduce_grads", "funcol_all_reduce",
           "in_process_all_reduce", "dummy_tokens"]


@dataclass
class StepOut:
    losses: list[torch.Tensor] = field(default_factory=list)   # per microbatch (CE only)
    slots: list[Slot] = field(default_factory=list)            # measured (run mode)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sl.metric, microbatch 0
    #: dry mode: one microbatch's compute per (pipeline rank, F or B, chunk)
    costs: dict[tuple[int, Kind, int], Cost] = field(default_factory=dict)


#: A user's loss: (the last chunk's output, this microbatch's target) -> a scalar.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_axes(t: torch.Tensor) -> sl.Axes:
    """The logical axes of an input given without any: batch, seq, then unsplit dims."""
    return (("batch", "seq") + (None,) * t.dim())[:t.dim()]


def _loss(constrain: Callable[[torch.Tensor, tuple], torch.Tensor], logits: torch.Tensor, tgt: torch.Tensor,
          aux: list[torch.Tensor], rec: Recorder | None,
          loss: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss reported, the loss differentiated: the reported one plus auxiliary
    losses); ``loss=None`` is next-token cross-entropy."""
    with (rec.site("loss") if rec else contextlib.nullcontext()):
        tgt = constrain(tgt, default_axes(tgt))
        ce = next_token_loss(logits, tgt) if loss is None else loss(logits, tgt)
        total = ce
        for a in aux:
            total = total + a
    return ce, total


def _scope(logits: torch.Tensor | None, loss: LossFn | None) -> contextlib.AbstractContextManager:
    """Next-token loss: torch's vocab-parallel scope; a user's loss runs as the user's
    loop would (its ``F.cross_entropy`` on sharded logits is vocab-parallel anyway)."""
    return loss_scope(logits) if loss is None else contextlib.nullcontext()  # type: ignore[arg-type]


def step_in_process(stages: Mapping[int, StageModel],
                    constrain: Mapping[int, Callable[[torch.Tensor, tuple], torch.Tensor]],
                    recs: Mapping[int, Recorder | None], pipe: Pipe,
                    idx: list[torch.Tensor], tgt: list[torch.Tensor],
                    active: Callable[[int], contextlib.AbstractContextManager],
                    tokens: Callable[[], torch.Tensor], *,
                    around: Callable[[int, Action], contextlib.AbstractContextManager] | None
                    = None, loss: LossFn | None = None) -> StepOut:
    """Run every pipeline rank's actions in this process (dry and simulate modes);
    ``around(rank, action)`` wraps each action (the memory meter's)."""
    todo = {r: actions(pipe, r) for r in stages}
    pos = dict.fromkeys(stages, 0)
    fwd: dict[tuple[int, int], Chunk] = {}
    wire: dict[tuple[Kind, int, int], torch.Tensor] = {}   # sent, not yet received
    inbox: dict[tuple[Kind, int, int], torch.Tensor] = {}  # received, not yet used
    grads_in: dict[tuple[int, int], torch.Tensor] = {}
    out = StepOut(losses=[None] * pipe.microbatches)  # type: ignore[list-item]
    last = pipe.chunks - 1

    def ready(a: Action) -> bool:
        if a.kind is Kind.RECV_F:
            return (Kind.SEND_F, a.chunk - 1, a.microbatch) in wire
        if a.kind is Kind.RECV_B:
            return (Kind.SEND_B, a.chunk + 1, a.microbatch) in wire
        return True

    # dry mode (meta tensors): every microbatch of a chunk issues the same collectives, so
    # microbatch 0 is traced and the others replay its records (a 16-stage pipeline of 16
    # microbatches traces 16 chunk steps, not 256)
    dry = idx[0].device.type == "meta"
    traced: dict[tuple[int, Kind, int], list] = {}

    def do(r: int, a: Action) -> None:
        rec = recs[r]
        key = (r, a.kind, a.chunk)
        if dry and rec is not None and a.kind in (Kind.F, Kind.B) and key in traced:
            _replay(r, a, rec, traced[key])
            rec.add_compute(Phase.FORWARD if a.kind is Kind.F else Phase.BACKWARD,
                            out.costs.get(key, Cost()))
            return
        start = len(rec.records) if rec else 0
        before = rec.compute_total() if rec else Cost()
        _do(r, a)
        if dry and rec is not None and a.kind in (Kind.F, Kind.B):
            traced[key] = rec.records[start:]
            out.costs[key] = rec.compute_total() - before

    def _replay(r: int, a: Action, rec: Recorder, records: list) -> None:
        for x in records:
            rec.add(dataclasses.replace(x, index=len(rec.records)))
        c, j = a.chunk, a.microbatch
        if a.kind is Kind.F:
            first = traced_chunks[(r, c)]
            out.losses[j] = out.losses[0]
            fwd[(c, j)] = Chunk(out=first.out, inp=first.inp)
        else:
            fwd.pop((c, j), None)
            first = traced_chunks[(r, c)]
            if first.inp is not None:  # one stand-in per chunk: only its shape is sent
                if (r, c) not in zero_grads:
                    zero_grads[(r, c)] = torch.zeros_like(first.inp)
                grads_in[(c, j)] = zero_grads[(r, c)]

    traced_chunks: dict[tuple[int, int], Chunk] = {}
    zero_grads: dict[tuple[int, int], torch.Tensor] = {}

    def _do(r: int, a: Action) -> None:
        st, con, rec = stages[r], constrain[r], recs[r]
        c, j = a.chunk, a.microbatch
        if a.kind is Kind.F:
            x = idx[j] if c == 0 else inbox.pop((Kind.RECV_F, c, j))
            ch = st.forward(c, x, tokens=tokens, constrain=con,
                            snapshot=rec.snapshot if rec else None)
            if j == 0:
                out.metrics.update(ch.metrics)
            if c == last:
                with _scope(ch.logits, loss):
                    ce, ch.loss = _loss(con, ch.logits, tgt[j], ch.aux, rec, loss)
                out.losses[j] = ce.detach()
            fwd[(c, j)] = ch
            if dry:
                traced_chunks[(r, c)] = Chunk(out=ch.out.detach(), inp=ch.inp)
        elif a.kind is Kind.B:
            ch = fwd.pop((c, j))
            if c == last:
                with _scope(ch.logits, loss):
                    ch.loss.backward()  # type: ignore[union-attr]
            else:
                torch.autograd.backward(ch.out, inbox.pop((Kind.RECV_B, c, j)))
            if ch.inp is not None:
                if ch.inp.grad is None:
                    raise sl.ShardingError(
                        f"pipeline chunk {c}'s output does not depend on the hidden state it "
                        f"received from chunk {c - 1}: the model's forward did not run its "
                        "layer stack (logical axis 'layers') on its first layer's input. A "
                        "pipeline swaps that input for the received activation, so the "
                        "forward must call the stack's layers (the module itself, not a copy "
                        "or a function bound to another model) in order")
                grads_in[(c, j)] = ch.inp.grad
        elif a.kind in (Kind.SEND_F, Kind.SEND_B):
            fw = a.kind is Kind.SEND_F
            t = fwd[(c, j)].out if fw else grads_in.pop((c, j))
            if rec:
                p2p_record(rec, send=True, forward=fw, t=t, chunk=c,
                           peer_chunk=c + 1 if fw else c - 1, microbatch=j, pp=pipe.pp)
            wire[(a.kind, c, j)] = t
        else:
            fw = a.kind is Kind.RECV_F
            peer = c - 1 if fw else c + 1
            t = wire.pop((Kind.SEND_F if fw else Kind.SEND_B, peer, j))
            t = t.detach().requires_grad_() if fw else t.detach()
            if rec:
                p2p_record(rec, send=False, forward=fw, t=t, chunk=c, peer_chunk=peer,
                           microbatch=j, pp=pipe.pp)
            inbox[(a.kind, c, j)] = t

    while any(pos[r] < len(todo[r]) for r in todo):
        moved = False
        for r in todo:
            with active(r):
                while pos[r] < len(todo[r]) and ready(todo[r][pos[r]]):
                    with (around(r, todo[r][pos[r]]) if around else contextlib.nullcontext()):
                        do(r, todo[r][pos[r]])
                    pos[r] += 1
                    moved = True
        if not moved:
            raise RuntimeError("pipeline actions deadlock")  # torch's orders never do
    return out


def step_torch(stage: StageModel, ctx: DTensorContext | None, rec: Recorder | None, pipe: Pipe,
               idx: torch.Tensor, tgt: torch.Tensor, group: dist.ProcessGroup,
               device: torch.device, tokens: Callable[[], torch.Tensor],
               constrain: Callable[[torch.Tensor, tuple], torch.Tensor], *,
               loss: LossFn | None = None,
               block: tuple[list[int], torch.dtype] | None = None) -> StepOut:
    """Run mode: this rank's chunks as torch.distributed.pipelining stages; ``block`` is
    this rank's block of the hidden state between chunks (default: from the plan's
    trace)."""
    out = StepOut()
    last = pipe.chunks - 1
    pending_aux: list[list[torch.Tensor]] = []

    class _ChunkModule(nn.Module):
        def __init__(self, chunk: int) -> None:
            super().__init__()
            self.chunk = chunk

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ch = stage.forward(self.chunk, x, tokens=tokens, constrain=constrain,
                               snapshot=rec.snapshot if rec else None)
            for k, v in ch.metrics.items():  # the first forward's (microbatch 0) values
                out.metrics.setdefault(k, v)
            if self.chunk == last:
                pending_aux.append(ch.aux)
                return ch.logits  # type: ignore[return-value]
            return ch.out

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, total = _loss(constrain, logits, target, pending_aux.pop(0), rec, loss)
        out.losses.append(ce.detach())
        return total

    ins, outs = _stage_args(stage, idx, block)
    stages = []
    for c in stage.chunks:
        # static shapes: torch's runtime inference would run extra forwards and backwards
        st = PipelineStage(_ChunkModule(c), c, pipe.chunks, device, group=group,
                           input_args=ins(c), output_args=outs(c))
        _instrument(st, rec, pipe, out)
        stages.append(st)
    if pipe.schedule is Schedule.INTERLEAVED:
        sched = ScheduleInterleaved1F1B(stages, pipe.microbatches, loss_fn=loss_fn,
                                        scale_grads=False)
    else:
        cls = ScheduleGPipe if pipe.schedule is Schedule.GPIPE else Schedule1F1B
        sched = cls(stages[0], pipe.microbatches, loss_fn=loss_fn, scale_grads=False)
    scope = (loss_parallel_needed(stage.plan) if last in stage.chunks and loss is None
             else contextlib.nullcontext())
    with scope:
        sched.step(idx, target=tgt, return_outputs=False)
    return out


def _stage_args(stage: StageModel, idx: torch.Tensor, block: tuple[list[int], torch.dtype] | None
                ) -> tuple[Callable[[int], torch.Tensor], Callable[[int], torch.Tensor]]:
    """Example input and output of each chunk (meta tensors): a microbatch of the input
    into the first, this rank's block of the hidden state between chunks, the last's
    output (never sent)."""
    m = stage.pipe.microbatches
    if block is None:
        if stage.pipeline.hidden is None:
            raise sl.ShardingError(
                "the pipeline could not see the hidden state entering the layer stack (the "
                "model did not run on meta tensors); check it with 'shardlang explain'")
        shape, dtype = stage.pipeline.hidden
        local = [shape[0] // m, *shape[1:]]
        if stage.dmesh is not None:
            for d, p in enumerate(stage.boundary()):
                if isinstance(p, Shard):
                    local[p.dim] //= stage.dmesh.size(d)
        block = (local, dtype)
    tokens = torch.empty(idx.shape[0] // m, *idx.shape[1:], dtype=idx.dtype, device="meta")
    hidden = torch.empty(block[0], dtype=block[1], device="meta", requires_grad=True)
    last = stage.pipe.chunks - 1

    def ins(c: int) -> torch.Tensor:
        return tokens if c == 0 else hidden

    def outs(c: int) -> torch.Tensor:
        # the last chunk's output (logits) is never sent; its example only has to exist
        return hidden if c < last else torch.empty(1, device="meta")
    return ins, outs


def _instrument(st: PipelineStage, rec: Recorder | None, pipe: Pipe, out: StepOut) -> None:
    """Record the stage's sends and receives in the order the schedule asks for them,
    and time its compute (for the measured bubble)."""
    c = st.stage_index

    def p2p(send: bool, forward: bool, t: torch.Tensor, mb: int) -> None:
        if rec is not None:
            peer = (c + 1 if send else c - 1) if forward else (c - 1 if send else c + 1)
            p2p_record(rec, send=send, forward=forward, t=t, chunk=c, peer_chunk=peer,
                       microbatch=mb, pp=pipe.pp)

    def compute(forward: bool, mb: int, t0: float, t1: float) -> None:
        out.slots.append(Slot(c % pipe.pp, Action(Kind.F if forward else Kind.B, c, mb), t0, t1))

    instrument_pipeline_stage(st, on_p2p=p2p, on_compute=compute)


def reduce_grads(stage: StageModel, pipe: Pipe, rec: Recorder | None) -> None:
    """After the last backward: 1/m scaling (the loss is a mean over microbatches), then
    each gradient to its parameter's placements (dp/ep/FSDP reduction). The sum over pp
    of shared parameters' gradients (:func:`sum_shared_grads`) comes after."""
    for p in stage.model.parameters():
        if p.grad is not None:
            p.grad.div_(pipe.microbatches)
    if stage.dmesh is not None:  # pp alone: nothing else to reduce
        sync_grads(stage.model, stage.plan, stage.dmesh, rec)


def funcol_all_reduce(group: dist.ProcessGroup) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def reduce(name: str, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, group)
    return reduce


def in_process_all_reduce(stages: Mapping[int, StageModel], recs: Mapping[int, Recorder | None],
                          pp: int) -> Callable[[int], Callable[[str, torch.Tensor], torch.Tensor]]:
    """Per pipeline rank, an all-reduce over pp that sums the stage models' gradients."""
    totals: dict[str, torch.Tensor] = {}

    def local(p: torch.Tensor) -> torch.Tensor:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        return g.to_local() if isinstance(g, DTensor) else g

    def for_rank(r: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        def reduce(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in totals:
                parts = [local(s.model.get_parameter(name)) for s in stages.values()]
                total = parts[0]
                for x in parts[1:]:
                    total = total + x
                totals[name] = total
            rec = recs[r]
            if rec is not None:
                rec.add(Record(index=len(rec.records), phase=Phase.BACKWARD,
                               site=rec.current_site(), op=Op.ALL_REDUCE, axis="pp",
                               shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                               bytes=t.numel() * t.element_size(), group_size=pp))
            return totals[name].clone()
        return reduce
    return for_rank


def dummy_tokens(shape: tuple[int, int], device: str) -> Callable[[], torch.Tensor]:
    """Token ids for chunks that are not the first (their embedding output is replaced)."""
    def make() -> torch.Tensor:
        with host_values():
            return torch.zeros(shape, dtype=torch.long, device=device)
    return make

