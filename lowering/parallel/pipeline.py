"""Pipeline stages: cut a model at its ``layers`` stack and run one chunk at a time.

A pipeline rank keeps the whole model object but only its own layers: the others are
replaced by :class:`_Skip` (no parameters). Running chunk ``c`` calls the model's own
``forward``: layers outside the chunk pass the hidden state through, a chunk that is
not the first swaps the hidden state at its first layer for the activation it received,
and a chunk that is not the last stops at its last layer. So any model whose forward
runs its ``layers`` stack in order, each layer taking the hidden state first and
returning it, can be pipelined without being rewritten.

What comes before the stack (the embedding) runs on every chunk, on dummy token ids
where the chunk is not the first (its result is replaced); its parameters therefore live
on every pipeline rank, and their gradients are summed over ``pp`` after backward
(:func:`sum_shared_grads`), as Megatron does for tied embeddings.

Between chunks travel plain local tensors: each rank's block of the hidden state in the
layout ``("batch", "norm_seq", "embed")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

import shardlang as sl
from lowering.plan import (BOUNDARY_AXES, Pipe, PipelinePlan, Plan, contiguous_stride,
                           hidden_key, layer_stack, placements)
from lowering.parallel.tensor import logits_of
from lowering.schedule import Op, Phase, Record, Recorder

__all__ = ["StageModel", "Chunk", "p2p_record", "sum_shared_grads"]

class _Skip(nn.Module):
    """A layer another pipeline rank owns: the hidden state passes through, in the
    structure the real layers return (a tensor, or a tuple whose first item it is)."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args: object, **kwargs: object) -> object:
        h = args[0] if args else kwargs[hidden_key(kwargs)]
        return (h,) if self.as_tuple else h


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("pipeline chunk ends here")
        self.value = value


class _Carry(torch.autograd.Function):
    """Identity on the hidden state that also backpropagates a chunk's auxiliary losses
    (MoE load balancing): the boundary carries them to the pipeline's backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.aux_like = aux
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        return g, torch.ones_like(ctx.aux_like)


def _hidden(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def _global_shape(local: torch.Size, pl: tuple[Placement, ...], dmesh: DeviceMesh) -> list[int]:
    shape = list(local)
    for d, p in enumerate(pl):
        if isinstance(p, Shard):
            shape[p.dim] *= dmesh.size(d)
    return shape


@dataclass
class Chunk:
    """What one chunk's forward produced on one microbatch."""

    out: torch.Tensor                   # local hidden block (sent), or the loss (last chunk)
    inp: torch.Tensor | None = None     # the received local block (grad goes back)
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sl.metric, this chunk


class StageModel:
    """One pipeline rank's part of a model: its chunks, run one at a time."""

    def __init__(self, model: nn.Module, plan: Plan, pipeline: PipelinePlan, pp_rank: int,
                 *, keep: bool = False) -> None:
        found = layer_stack(model)
        pipe = pipeline.pipe
        if found is None:
            raise sl.ShardingError(
                f"pp={pipe.pp} needs the model's layer stack marked with the logical axis "
                "'layers': sl.axes(self.blocks, 'layers') in the model, or "
                "sl.annotate(model, {'<path of the ModuleList>': ('layers',)})")
        self.path, self.stack = found
        self.model, self.plan, self.pipeline, self.pp_rank = model, plan, pipeline, pp_rank
        self.pipe: Pipe = pipe
        self.n_layers = len(self.stack)
        self.chunks = pipe.chunks_of(pp_rank)
        own = {i for c in self.chunks for i in pipe.layers_of(c, self.n_layers)}
        self.blocks = {i: self.stack[i] for i in own}
        if not keep:  # keep: every pipeline rank of this process shares the one model
            for i in range(self.n_layers):
                if i not in own:
                    self.stack[i] = _Skip(pipeline.layer_tuple)
        self.dmesh: DeviceMesh | None = None

    def holds(self, name: str) -> bool:
        """This pipeline rank holds the parameter ``name`` (its own layers', or shared)."""
        if self.is_shared(name):
            return True
        index = name[len(self.path) + 1:].split(".", 1)[0]
        return index.isdigit() and int(index) in self.blocks

    def is_shared(self, name: str) -> bool:
        """A parameter outside the layer stack (every pipeline rank holds it)."""
        return not name.startswith(f"{self.path}.")

    @contextlib.contextmanager
    def _view(self, chunk: int, h_in: torch.Tensor | None) -> Iterator[None]:
        layers = self.pipe.layers_of(chunk, self.n_layers)
        last = chunk == self.pipe.chunks - 1
        resting = list(self.stack)
        for i in range(self.n_layers):
            self.stack[i] = self.blocks[i] if i in layers else _Skip(self.pipeline.layer_tuple)
        handles = self._check_chain()
        if h_in is not None:
            def swap(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    return (h_in, *args[1:]), kwargs
                return args, {**kwargs, hidden_key(kwargs): h_in}
            # a chunk of no layers (the head's alone) takes its input at the last layer,
            # which passes it through as every layer this chunk does not hold does
            at = min(layers.start, self.n_layers - 1)
            handles.append(self.stack[at].register_forward_pre_hook(swap, with_kwargs=True))
        if not last:
            def stop(mod: nn.Module, args: tuple, out: object) -> None:
                raise _Stop(_hidden(out))
            # the embedding's chunk ends after layer 0, which passes the embedding through
            at = layers.stop - 1 if len(layers) else layers.start
            handles.append(self.stack[at].register_forward_hook(stop))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for i, mod in enumerate(resting):
                self.stack[i] = mod

    def _check_chain(self) -> list:
        """Hooks that check what cutting the stack assumes: each layer's input is the very
        hidden state the layer before returned (nothing runs between two layers)."""
        returned: dict[int, int] = {}

        def after(i: int) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple, out: object) -> None:
                returned[i] = id(_hidden(out))
            return hook

        def before(i: int) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs.get(hidden_key(kwargs))
                if i - 1 in returned and id(h) != returned[i - 1]:
                    raise sl.ShardingError(
                        f"pp cuts {type(self.model).__name__}.{self.path} (logical axis "
                        f"'layers') between its layers, but layer {i}'s input is not what "
                        f"layer {i - 1} returned: something runs between two layers (a "
                        "residual outside the layer, 'h = h + block(h)', or a norm or "
                        "dropout between them). A pipeline replaces the layers a stage "
                        "does not own by the identity, so move that code into the layer "
                        "('h = block(h)' with the residual inside block.forward)")
            return hook

        handles = []
        for i in range(self.n_layers):
            if i > 0:
                # first of the layer's pre-hooks: it sees the input as the model passed it
                handles.append(self.stack[i].register_forward_pre_hook(
                    before(i), with_kwargs=True, prepend=True))
            handles.append(self.stack[i].register_forward_hook(after(i)))
        return handles

    def boundary(self) -> tuple[Placement, ...]:
        return placements(self.plan.rules.spec(BOUNDARY_AXES, where="the pipeline boundary"),
                          self.plan.mesh)

    def forward(self, chunk: int, x: torch.Tensor, *, tokens: Callable[[], torch.Tensor],
                constrain: Callable[[torch.Tensor, sl.Axes], torch.Tensor],
                snapshot: Callable[[], Callable[[], None]] | None = None) -> Chunk:
        """Run ``chunk`` on ``x``: token ids for the first chunk, else the received local
        hidden block. Returns the local block to send (or, last chunk, the logits)."""
        pl = self.boundary() if self.dmesh is not None else ()
        first, last = chunk == 0, chunk == self.pipe.chunks - 1
        h_in = inp = None
        if not first:
            inp = h_in = x
            if self.dmesh is not None:
                shape = _global_shape(x.shape, pl, self.dmesh)
                h_in = DTensor.from_local(x, self.dmesh, pl, run_check=False,
                                          shape=torch.Size(shape), stride=contiguous_stride(shape))
            x = tokens()
        undo = snapshot() if snapshot else (lambda: None)
        with sl.collecting() as reported, self._view(chunk, h_in):
            try:
                out = self.model(constrain(x, ("batch", "seq")))
            except _Stop as stop:
                undo()
                out = stop.value
        aux = reported.total_aux()
        if last:
            logits = logits_of(out)
            return Chunk(out=logits, inp=inp, logits=logits, aux=[aux] if aux is not None else [],
                         metrics=reported.metrics)
        h = constrain(out, BOUNDARY_AXES)
        if aux is not None:
            h = _Carry.apply(h, aux)
        if isinstance(h, DTensor):
            h = h.to_local(grad_placements=pl)
        return Chunk(out=h, inp=inp, metrics=reported.metrics)


def p2p_record(rec: Recorder, *, send: bool, forward: bool, t: torch.Tensor, chunk: int,
               peer_chunk: int, microbatch: int, pp: int) -> None:
    """One send or receive of a pipeline boundary, as every mode records it."""
    shift = 1 if peer_chunk > chunk else -1
    lo, hi = min(chunk, peer_chunk), max(chunk, peer_chunk)
    nbytes = t.numel() * t.element_size()
    rec.add(Record(
        index=len(rec.records), phase=Phase.FORWARD if forward else Phase.BACKWARD,
        site=f"pipeline {lo}->{hi} ({'activation' if forward else 'gradient'}, "
             f"microbatch {microbatch})",
        op=Op.SEND if send else Op.RECV, axis="pp", shape=tuple(t.shape),
        dtype=str(t.dtype).removeprefix("torch."), bytes=nbytes, group_size=pp,
        peer_shift=shift))


def sum_shared_grads(stage: StageModel, all_reduce: Callable[[str, torch.Tensor], torch.Tensor],
                     rec: Recorder | None) -> None:
    """Sum, over ``pp``, the gradients of parameters every pipeline rank holds (outside
    the layer stack: embeddings, final norm, head), in name order on every rank."""
    for name, p in stage.model.named_parameters():
        if not stage.is_shared(name):
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        local = g.to_local() if isinstance(g, DTensor) else g
        with (rec.site(f"{name} (held by every pipeline stage)", Phase.BACKWARD)
              if rec else contextlib.nullcontext()):
            summed = all_reduce(name, local)
        if isinstance(g, DTensor):
            g = DTensor.from_local(summed, g.device_mesh, g.placements, run_check=False,
                                   shape=g.shape, stride=g.stride())
        else:
            g = summed
        p.grad = g
