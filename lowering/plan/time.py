"""Predicted step time: compute from the traced ops, communication from the recorded
schedule, the pipeline from the schedule's action order.

Inputs are numbers a dry trace produced (nothing here executes): each pipeline rank's
compute per action (:class:`lowering.schedule.Cost`: FLOPs of matmuls and fused attention,
bytes of every other op) and its recorded collectives. The model:

* **compute** of an action: ``matmul flops / (peak(precision) * matmul_efficiency) +
  attention flops / (peak * attention_efficiency) + bytes / (hbm_bw * hbm_efficiency)``
  (:mod:`lowering.plan.devices` for the factors and their sources), where ``bytes`` are
  those of the memory-bound ops after fusion on a GPU (:mod:`lowering.schedule.fusion`:
  chains of pointwise ops and reductions between two matmuls as one kernel, as fused
  kernels and ``torch.compile`` run them) and every eager op's on ``cpu``; a causal fused
  attention's FLOPs count half (its kernel skips the masked blocks), and the blocks ring
  attention skips under a causal mask take no time. Reported TFLOP/s count the FLOPs
  the model needs: every matmul's, and attention's over the (query, key) pairs a causal
  mask leaves, half of the square, as FlashAttention's own benchmarks count causal
  attention (whichever rank or ring step computes them, so they do not depend on the
  layout). Counting the masked half too, as Megatron-LM's and PaLM's formulas do, would
  make a long sequence look faster than a short one on the same kernels.
* **a collective**: ``latency * ring steps + wire bytes / bandwidth`` with the ring
  formulas of :func:`lowering.schedule.wire_bytes`; the link is NVLink when the group's
  ranks span at most ``gpus_per_node`` consecutive ranks (canonical order, tp innermost),
  else the network.
* **overlap** (stated assumptions, what NCCL on its own stream gives a well-written loop):
  gradient buckets (sites ``grads ...``) and FSDP's reduce-scatters hide behind the
  backward's compute, FSDP's all-gathers behind the forward's (prefetch), except the last
  bucket and the first gather, which are always exposed; under a pipeline the gradient
  reductions of each model chunk go on the wire during its last backward and hide
  behind the backwards the stage runs after it (one communication stream, the chunks in
  the order they finish; the last chunk's last bucket always shows), as torch's
  pipeline stages and Megatron-LM reduce each chunk's gradients once its last
  microbatch is through. Tensor-, sequence- and
  expert-parallel collectives are on the critical path (the next op needs their result).
  The all-reduce of parameters every pipeline stage holds runs after the pipeline.
* **pipeline**: every rank's actions in the schedule's own order
  (:func:`lowering.plan.pipeline.timeline` with these costs), a send taking one boundary
  transfer, so the bubble is the schedule's real one (interleaving included).
* the optimizer's step: its ops' bytes (AdamW is memory-bound) after the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import shardlang as sl
from shardlang.mesh import MESH_AXES
from lowering.plan.devices import Device
from lowering.plan.pipeline import Action, Kind, Pipe, bubble_of, bubble_theory, timeline
from lowering.schedule.records import Cost, Op, Phase, Record, wire_bytes

__all__ = ["Predicted", "predict", "predict_items", "Item", "record_items", "overlap_kind",
           "collective_seconds", "link_of", "compute_seconds"]

#: (F/B/O, chunk) -> one microbatch's compute; ("R", chunk): the forward a backward of
#: that chunk runs again under activation recompute (:mod:`lowering.plan.recompute`)
StageCompute = Mapping[tuple[str, int], Cost]


@dataclass(frozen=True)
class Predicted:
    step_s: float
    tokens_per_s: float
    tflops_per_gpu: float   # the model's FLOPs per second per GPU (TFLOP/s; recompute not counted)
    mfu: float              # tflops_per_gpu / the device's peak for the precision
    axis_s: dict[str, float]  # seconds in each mesh axis's collectives (the slowest stage)
    exposed_s: dict[str, float]  # of which on the critical path
    compute_s: float        # the slowest stage's compute (all its actions)
    bubble: float
    why: str = ""
    hardware_tflops_per_gpu: float = 0.0  # executed FLOPs, recomputed forwards included

    def json(self) -> dict[str, object]:
        return {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
                "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
                "axis_s": dict(self.axis_s), "exposed_s": dict(self.exposed_s),
                "compute_s": self.compute_s, "bubble": self.bubble, "why": self.why}


def compute_seconds(c: Cost, dev: Device, precision: str) -> float:
    """Matmul FLOPs at the device's achievable fraction of its peak, fused attention's at
    the attention kernel's (a causal one runs half its counted FLOPs), every other op's
    bytes at its achievable bandwidth: those a fusing stack moves on a GPU profile, every
    eager op's on one that does not fuse (``cpu``)."""
    peak = dev.peak(precision)
    attention = c.attention_flops - c.skipped_flops
    return ((c.flops - c.attention_flops) / (peak * dev.matmul_efficiency)
            + attention / (peak * dev.attention_efficiency)
            + c.memory_bytes(dev.fuses) / (dev.hbm_bw * dev.hbm_efficiency))


def _stride(mesh: sl.Mesh, axis: str) -> int:
    inner = MESH_AXES[MESH_AXES.index(axis) + 1:]
    return math.prod(mesh.axis_size(a) for a in inner)


def link_of(mesh: sl.Mesh, axis: str, dev: Device, gpus_per_node: int | None = None
            ) -> tuple[float, float, str]:
    """(bandwidth, latency, "nvlink"/"network") of ``axis``'s groups (a ``+``-joined axis
    uses the slowest of its parts)."""
    g = gpus_per_node or dev.gpus_per_node
    span = 1
    for a in axis.split("+"):
        if a not in MESH_AXES:
            continue
        n = mesh.axis_size(a)
        span = max(span, _stride(mesh, a) * (1 if a == "pp" else n - 1) + 1)
    if span <= g:
        return dev.intra_node_bw, dev.intra_node_latency, "nvlink"
    return dev.inter_node_bw, dev.inter_node_latency, "network"


def _steps(op: Op, n: int) -> int:
    if op is Op.ALL_REDUCE:
        return 2 * (n - 1)
    if op in (Op.SEND, Op.RECV, Op.PERMUTE):
        return 1
    return n - 1


def collective_seconds(r: Record, mesh: sl.Mesh, dev: Device,
                       gpus_per_node: int | None = None) -> float:
    if r.op is Op.RECV or r.group_size <= 1:
        return 0.0
    bw, lat, _ = link_of(mesh, r.axis, dev, gpus_per_node)
    return lat * _steps(r.op, r.group_size) + wire_bytes(r.op, r.bytes, r.group_size) / bw


def overlap_kind(r: Record) -> str:
    """How a record overlaps: "grad" (hidden by the backward), "gather" (FSDP's, hidden
    by the forward's prefetch), "p2p", "after" (after the pipeline), "critical"."""
    if r.op in (Op.SEND, Op.RECV):
        return "p2p"
    if r.phase is Phase.OPTIMIZER or (r.axis == "pp"):
        return "after"
    dp = "dp" in r.axis.split("+")
    if r.site.startswith("grads") or (dp and r.op is Op.REDUCE_SCATTER) or (
            dp and r.op is Op.ALL_REDUCE and r.phase is Phase.BACKWARD):
        return "grad"  # a bucket, FSDP's reduce-scatter, a gradient reduced on its own
    if r.op is Op.ALL_GATHER and "dp" in r.axis.split("+"):
        return "gather"
    return "critical"


def _hidden(n: int, total: float, always: float, window: float) -> float:
    """Exposed seconds of ``n`` collectives (``total`` seconds) overlapping a compute
    ``window``: the first (or last) one, ``always`` seconds, always; the rest beyond the
    window."""
    if not n:
        return 0.0
    return always + max(0.0, total - always - window)


class _Group:
    """The collectives of one (kind, phase) on a stage: how many, their seconds in all
    and per axis, the first one's and the last one's."""

    __slots__ = ("n", "total", "first", "last", "axes")

    def __init__(self, first: float = 0.0) -> None:
        self.n, self.total, self.first, self.last = 0, 0.0, first, 0.0
        self.axes: dict[str, float] = {}

    def take(self, t: float, ax: str, n: int = 1) -> None:
        """``n`` more of ``t`` seconds each, on ``ax``."""
        self.n += n
        self.total += t * n
        self.last = t
        self.axes[ax] = self.axes.get(ax, 0.0) + t * n


#: one collective's (or a run of equal ones') place in the model: (kind, phase, axis,
#: seconds of one, how many); kind as :func:`overlap_kind` says
Item = tuple[str, Phase, str, float, int]


def record_items(records: Sequence[Record], mesh: sl.Mesh, dev: Device,
                 gpus_per_node: int | None = None) -> list[Item]:
    return [(overlap_kind(r), r.phase, r.axis, collective_seconds(r, mesh, dev, gpus_per_node), 1)
            for r in records]


@dataclass
class _Stage:
    f: dict[int, float]      # chunk -> one microbatch's forward seconds, comm included
    b: dict[int, float]
    tail: float              # after the pipeline: exposed gradient sync, shared, optimizer
    compute: float           # the whole step's compute on this stage
    flops: float             # the whole step's FLOPs (the model's: recompute not counted)
    hardware_flops: float    # and those executed
    axis: dict[str, float]
    exposed: dict[str, float]
    #: pipelined: the gradient syncs (and backward gathers) in seconds, per axis and the
    #: last one's, hidden behind the backwards that follow each chunk's last one
    sync: float = 0.0
    sync_axes: dict[str, float] | None = None
    sync_last: float = 0.0

    def expose_sync(self, seconds: float) -> None:
        """Attribute ``seconds`` of the syncs' time to their axes as exposed."""
        total = sum((self.sync_axes or {}).values())
        for ax, t in (self.sync_axes or {}).items():
            self.exposed[ax] = self.exposed.get(ax, 0.0) + seconds * t / total


def _sync_exposed(st: _Stage, last_backward: Mapping[int, tuple[float, float]],
                  end: float) -> float:
    """Exposed seconds of a pipeline stage's gradient syncs: chunk c's share (by its
    backward's compute) goes on the wire while its last backward runs, the last of it
    after that backward, one chunk after another (one communication stream), so what
    the later chunks' backwards leave undone by ``end`` (the stage's last action) shows.
    ``last_backward``: chunk -> (start, end) of its last backward."""
    if not st.sync:
        return 0.0
    total_b = sum(st.b[c] for c in last_backward) or 1.0
    t = -math.inf
    for c, (t0, t1) in sorted(last_backward.items(), key=lambda kv: kv[1][1]):
        share = st.sync * st.b[c] / total_b
        t = max(max(t, t0) + share, t1 + min(share, st.sync_last))
    return max(0.0, t - end)


def _stage(compute: StageCompute, items: Sequence[Item], chunks: Sequence[int], m: int,
           dev: Device, precision: str, pipelined: bool) -> _Stage:
    sec = {k: compute_seconds(c, dev, precision) for k, c in compute.items()}
    f = {c: sec.get(("F", c), 0.0) for c in chunks}
    b = {c: sec.get(("B", c), 0.0) + sec.get(("R", c), 0.0) for c in chunks}
    axis: dict[str, float] = {}
    exposed: dict[str, float] = {}
    groups: dict[tuple[str, Phase], _Group] = {}
    for kind, phase, ax, t, n in items:  # one pass: a stage of a long pipeline has thousands
        axis[ax] = axis.get(ax, 0.0) + t * n
        g = groups.get((kind, phase))
        if g is None:
            g = groups[(kind, phase)] = _Group(t)
        g.take(t, ax, n)

    def group(kind: str, phase: Phase) -> _Group:
        return groups.get((kind, phase)) or _Group()

    def add(kind: str, phase: Phase, seconds: float) -> None:
        """Attribute ``seconds`` of exposed time to the axes of these collectives."""
        g = groups.get((kind, phase))
        if g is None or not g.total:
            return
        for ax, t in g.axes.items():
            exposed[ax] = exposed.get(ax, 0.0) + seconds * t / g.total

    fwd_total, bwd_total = sum(f.values()) * m, sum(b.values()) * m
    # critical collectives: spread over the stage's actions like its compute
    for phase, per, total in ((Phase.FORWARD, f, fwd_total), (Phase.BACKWARD, b, bwd_total)):
        crit = group("critical", phase).total
        add("critical", phase, crit)
        for c in chunks:
            share = per[c] * m / total if total else 1.0 / len(chunks)
            per[c] += crit * share / m
    gather, gather_b = group("gather", Phase.FORWARD), group("gather", Phase.BACKWARD)
    grads_b, grads_f = group("grad", Phase.BACKWARD), group("grad", Phase.FORWARD)
    n_grads = grads_b.n + grads_f.n
    g_exp = _hidden(gather.n, gather.total, gather.first, fwd_total)
    # the gradient syncs and backward gathers in order: backward gathers, then the
    # gradients (backward, then forward phase); the last of them is always exposed
    late = next((g.last for g in (grads_f, grads_b, gather_b) if g.n), 0.0)
    add("gather", Phase.FORWARD, g_exp)
    gb_exp = 0.0
    if not pipelined:  # a pipeline's: once the timeline says when each chunk's last backward ends
        gb_exp = _hidden(n_grads + gather_b.n, gather_b.total + grads_b.total + grads_f.total,
                         late, bwd_total)
        n_late = max(1, n_grads + gather_b.n)
        for ph, g in ((Phase.BACKWARD, grads_b), (Phase.FORWARD, grads_f)):  # each its share
            add("grad", ph, gb_exp * g.n / n_late)
        add("gather", Phase.BACKWARD, gb_exp * gather_b.n / n_late)
    sync_axes: dict[str, float] = {}
    for g in (grads_b, grads_f, gather_b):
        for ax, t in g.axes.items():
            sync_axes[ax] = sync_axes.get(ax, 0.0) + t
    after = 0.0
    for kind, ph in [k for k in groups if k[0] == "after"]:
        t_after = groups[(kind, ph)].total
        add(kind, ph, t_after)
        after += t_after
    opt = sec.get(("O", 0), 0.0)
    tail = after + opt
    if pipelined:
        f[chunks[0]] += g_exp / m  # the forward gathers' exposed part lengthens the first forward
    else:
        f[chunks[0]] += g_exp
        b[chunks[0]] += gb_exp
    # the model's FLOPs: a causal mask's hidden half not counted (module docstring)
    flops = sum((c.flops - c.skipped_flops) * (m if k[0] in "FB" else 1)
                for k, c in compute.items() if k[0] != "R")
    again = sum((c.flops - c.skipped_flops) * m for k, c in compute.items() if k[0] == "R")
    return _Stage(f, b, tail, fwd_total + bwd_total + opt, flops, flops + again, axis, exposed,
                  sync=(gather_b.total + grads_b.total + grads_f.total) if pipelined else 0.0,
                  sync_axes=sync_axes, sync_last=late)


def predict(mesh: sl.Mesh, dev: Device, *, precision: str, compute: Mapping[int, StageCompute],
            records: Mapping[int, Sequence[Record]], pipe: Pipe | None, tokens: int,
            gpus_per_node: int | None = None) -> Predicted:
    """One training step's predicted time on ``dev`` (module docstring for the model).
    ``compute``/``records``: per pipeline coordinate, rank 0's (every rank of a stage runs
    the same program); ``tokens``: the global batch's tokens per step."""
    items = {r: record_items(rs, mesh, dev, gpus_per_node) for r, rs in records.items()}
    sends = [x for rs in records.values() for x in rs if x.op is Op.SEND]
    hop = max((collective_seconds(x, mesh, dev, gpus_per_node) for x in sends), default=0.0)
    return predict_items(dev, precision=precision, compute=compute, items=items, pipe=pipe,
                         tokens=tokens, hop=hop)


def predict_items(dev: Device, *, precision: str, compute: Mapping[int, StageCompute],
                  items: Mapping[int, Sequence[Item]], pipe: Pipe | None, tokens: int,
                  hop: float = 0.0, closed_form: bool = False) -> Predicted:
    """:func:`predict` from collectives already timed (``plan``'s estimates make them
    from formulas; ``hop``: one pipeline boundary's transfer). ``closed_form``: the
    pipeline's span from :func:`lowering.plan.pipeline.bubble_theory` instead of walking
    the action order (the estimate of thousands of candidates; stage 0's costs)."""
    pp = pipe.pp if pipe else 1
    m = pipe.microbatches if pipe else 1
    stages = {r: _stage(compute[r], items.get(r, []), pipe.chunks_of(r) if pipe else [0], m,
                        dev, precision, pipe is not None)
              for r in (range(pp) if not closed_form else [0])}
    if pipe is None:
        st = stages[0]
        step = st.f[0] + st.b[0] + st.tail
        bubble = 0.0
        ends = {0: step}
    else:
        def cost(r: int, a: Action) -> float:
            return (stages[r].f if a.kind is Kind.F else stages[r].b)[a.chunk]

        if closed_form:  # the syncs hidden behind the last backward only
            st = stages[0]
            busy = m * sum(st.f[c] + st.b[c] for c in st.f)
            span = busy / (1 - bubble_theory(pipe)) + hop * 2 * (pipe.pp - 1)
            sync = _hidden(1, st.sync, st.sync_last, st.b[min(st.b)])
            return _result(stages, {0: span + sync + st.tail}, bubble_theory(pipe), tokens,
                           dev, precision)
        slots = timeline(pipe, cost=cost, hop=hop)
        t0 = min(s.start for s in slots)
        ends = {}
        for r in range(pp):
            mine = [s for s in slots if s.rank == r]
            end = max(s.end for s in mine)
            last = {s.action.chunk: (s.start, s.end) for s in
                    sorted(mine, key=lambda s: s.end) if s.action.kind is Kind.B}
            sync = _sync_exposed(stages[r], last, end)
            stages[r].expose_sync(sync)
            ends[r] = end - t0 + sync + stages[r].tail
        bubble = bubble_of(slots, pp)
    return _result(stages, ends, bubble, tokens, dev, precision)


def _result(stages: Mapping[int, _Stage], ends: Mapping[int, float], bubble: float,
            tokens: int, dev: Device, precision: str) -> Predicted:
    step = max(ends.values())
    slow = max(stages, key=lambda r: ends[r])
    st = stages[slow]
    flops = sum(s.flops for s in stages.values()) / len(stages)
    tflops = flops / step / 1e12 if step else 0.0
    hw = sum(s.hardware_flops for s in stages.values()) / len(stages) / step / 1e12 if step else 0.0
    return Predicted(
        step_s=step, tokens_per_s=tokens / step if step else 0.0, tflops_per_gpu=tflops,
        mfu=tflops * 1e12 / dev.peak(precision), axis_s=dict(sorted(st.axis.items())),
        exposed_s=dict(sorted(st.exposed.items())), compute_s=st.compute, bubble=bubble,
        why=_why(step, st.compute, st.exposed, bubble), hardware_tflops_per_gpu=hw)


def _why(step: float, compute: float, exposed: Mapping[str, float], bubble: float) -> str:
    """What the step's time goes to, largest first."""
    if not step:
        return "no work traced"
    parts = [f"compute {compute / step:.0%}"]
    for ax, t in sorted(exposed.items(), key=lambda kv: -kv[1]):
        if t / step >= 0.01:
            parts.append(f"{ax} collectives {t / step:.0%}")
    if bubble >= 0.01:
        parts.append(f"pipeline bubble {bubble:.0%}")
    return ", ".join(parts)
