"""Pipeline parallelism as data: the schedule of each pipeline rank, its Gantt chart and bubble.

The layer stack a model marks with the logical axis ``layers`` is cut into ``pp * v``
chunks of consecutive layers (``v`` virtual stages per pipeline rank, interleaved only);
chunk ``c`` lives on pipeline rank ``c % pp``, the first chunk also runs what comes before
the stack (the embedding), the last chunk what comes after (final norm, head, loss).

Each pipeline rank executes an ordered list of :class:`Action` s: compute (``F``, ``B``
for one chunk and microbatch) and point-to-point communication (``SEND_F``, ``RECV_F``,
``SEND_B``, ``RECV_B``). The orders are torch.distributed.pipelining's own: GPipe and 1F1B
are written out here as ``ScheduleGPipe`` / ``Schedule1F1B`` issue them (a test compares
them with a real torchrun launch), interleaved 1F1B is read from
``ScheduleInterleaved1F1B`` itself. Every mode executes these lists, so dry, simulate and
run record the same sends and receives in the same order.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import shardlang as sl
from lowering._torch import interleaved_order
from lowering.plan.options import Schedule, given
from shardlang.errors import divisors

__all__ = ["Schedule", "Pipe", "Action", "Kind", "Slot", "actions", "timeline", "gantt_rows",
           "bubble_theory", "bubble_of", "check_pipe", "describe_pipe", "layer_stack",
           "hidden_key", "microbatch_rows", "BOUNDARY_AXES"]

#: The layout of the hidden state between pipeline chunks (the residual stream).
BOUNDARY_AXES: sl.Axes = ("batch", "norm_seq", "embed")


class Kind(enum.Enum):
    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def compute(self) -> bool:
        return self in (Kind.F, Kind.B)


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    chunk: int        # the model chunk (torch's "stage index"), 0 .. pp*v-1
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.microbatch}@{self.chunk}"


@dataclass(frozen=True, slots=True)
class Pipe:
    """A pipeline: ``pp`` ranks, ``v`` chunks per rank, ``m`` microbatches."""

    schedule: Schedule
    pp: int
    microbatches: int
    virtual: int = 1

    @property
    def chunks(self) -> int:
        return self.pp * self.virtual

    def rank_of(self, chunk: int) -> int:
        return chunk % self.pp

    def chunks_of(self, pp_rank: int) -> list[int]:
        return list(range(pp_rank, self.chunks, self.pp))

    def layer_counts(self, n_layers: int) -> list[int]:
        """Layers per chunk: equal, or where ``chunks`` does not divide the layers, one more
        in the chunks nearest the middle (the first and last chunks also hold the
        embedding and the head, so they get the fewer): 126 layers on 16 chunks are
        7 x 8 + 9 x 7 ... arranged 7, 7, ..., 8, 8, ..., 7. One or two chunks more than
        layers (the balanced pipeline of the Llama 3 paper, section 3.3.2: 126 layers on
        16 ranks x 8 chunks) give every chunk one layer but the last, which holds only the
        head and the loss, and with two more the first, which holds only the embedding."""
        c = self.chunks
        if c > n_layers:  # Llama 3's balanced pipeline: one layer a chunk, the edges bare
            return [0 if i == c - 1 or (i == 0 and c == n_layers + 2) else 1 for i in range(c)]
        base, extra = divmod(n_layers, c)
        middle = sorted(range(c), key=lambda i: (abs(2 * i - (c - 1)), i))[:extra]
        return [base + (i in middle) for i in range(c)]

    def layers_of(self, chunk: int, n_layers: int) -> range:
        counts = self.layer_counts(n_layers)
        start = sum(counts[:chunk])
        return range(start, start + counts[chunk])

    def chunk_of(self, layer: int, n_layers: int) -> int:
        """The chunk that holds ``layer``."""
        end = 0
        for chunk, n in enumerate(self.layer_counts(n_layers)):
            end += n
            if layer < end:
                return chunk
        raise IndexError(layer)


def check_pipe(pipe: Pipe, *, n_layers: int, where: str, batch: int | None = None,
               dp_ways: int = 1) -> None:
    """Every pipeline mistake as a ShardingError: layers, microbatches, schedule limits."""
    p, v, m = pipe.pp, pipe.virtual, pipe.microbatches
    if m < 1:
        raise sl.ShardingError(f"{given('microbatches', m)}: must be a positive integer")
    if pipe.schedule is Schedule.INTERLEAVED and v < 2:
        raise sl.ShardingError(
            f"the interleaved schedule needs v >= 2 virtual stages per pipeline rank, got "
            f"{given('virtual', v)}; pass virtual=2 (--virtual-stages 2) or more, or use "
            "schedule='1f1b' (--schedule 1f1b)")
    if pipe.schedule is not Schedule.INTERLEAVED and v != 1:
        raise sl.ShardingError(
            f"{given('virtual', v)} needs schedule='interleaved' (--schedule interleaved): "
            f"{pipe.schedule.value} runs one stage per pipeline rank")
    if n_layers + 2 < p * v:
        raise sl.ShardingError(
            f"pp*v = {p}*{v} = {p * v} pipeline chunks but {where} has {n_layers} layers "
            f"(logical axis 'layers'): each chunk holds at least one whole layer, but the "
            f"first may hold only the embedding and the last only the head; choose "
            f"pp*v <= {n_layers + 2}")
    if pipe.schedule is Schedule.ONE_F_ONE_B and m < p:
        raise sl.ShardingError(
            f"1F1B needs at least as many microbatches as pipeline stages: "
            f"{given('microbatches', m)} < pp={p}; use microbatches={p} (--microbatches {p}) "
            "or more, or schedule='gpipe' (--schedule gpipe)")
    if pipe.schedule is Schedule.INTERLEAVED:
        rounds = max(1, m // p)
        if m % rounds:
            raise sl.ShardingError(
                f"interleaved 1F1B runs microbatches in rounds of pp={p}: "
                f"{given('microbatches', m)} must be a multiple of {rounds} rounds; use a "
                f"multiple of {p}")
    if batch is not None and batch % (dp_ways * m):
        ok = [d for d in divisors(batch // dp_ways) if batch % (dp_ways * d) == 0] \
            if batch % dp_ways == 0 else []
        raise sl.ShardingError(
            f"the batch ({batch}) must split into {m} microbatches on each of the {dp_ways} "
            f"data-parallel ranks: batch must be divisible by dp-ways*microbatches = "
            f"{dp_ways}*{m} = {dp_ways * m}; choose microbatches (--microbatches) in "
            f"{{{', '.join(map(str, ok)) or '-'}}} or change batch (--batch)")


# -- action orders ---------------------------------------------------------------------------
def _single(pipe: Pipe, rank: int) -> list[Action]:
    """GPipe / 1F1B on one pipeline rank, in the order torch's schedules issue them: for
    every compute action, its receive, the compute, then its send."""
    p, m, last = pipe.pp, pipe.microbatches, pipe.pp - 1
    if pipe.schedule is Schedule.GPIPE:
        order = [(Kind.F, i) for i in range(m)] + [(Kind.B, i) for i in range(m)]
    else:  # Schedule1F1B: warm-up of p - rank forwards, then 1B1F, then cool-down
        warm = min(m, p - rank)
        order = [(Kind.F, i) for i in range(warm)]
        f, b = warm, 0
        while True:
            order.append((Kind.B, b))
            b += 1
            if f == m:
                break
            order.append((Kind.F, f))
            f += 1
        order += [(Kind.B, i) for i in range(b, m)]
    out: list[Action] = []
    for kind, mb in order:
        if kind is Kind.F:
            if rank > 0:
                out.append(Action(Kind.RECV_F, rank, mb))
            out.append(Action(Kind.F, rank, mb))
            if rank < last:
                out.append(Action(Kind.SEND_F, rank, mb))
        else:
            if rank < last:
                out.append(Action(Kind.RECV_B, rank, mb))
            out.append(Action(Kind.B, rank, mb))
            if rank > 0:
                out.append(Action(Kind.SEND_B, rank, mb))
    return out


def actions(pipe: Pipe, rank: int) -> list[Action]:
    """The ordered actions of pipeline rank ``rank`` (a fresh list; the orders are cached:
    torch builds an interleaved one in about half a second at pp=16, m=64)."""
    return list(_actions(pipe, rank))


@functools.lru_cache(maxsize=256)
def _actions(pipe: Pipe, rank: int) -> tuple[Action, ...]:
    if pipe.schedule is not Schedule.INTERLEAVED:
        return tuple(_single(pipe, rank))
    kinds = {k.value: k for k in Kind}
    kinds.update(FORWARD=Kind.F, FULL_BACKWARD=Kind.B)
    out = []
    for chunk, kind, mb in interleaved_order(pipe.pp, pipe.virtual, pipe.microbatches, rank):
        if kind in kinds:
            out.append(Action(kinds[kind], chunk, mb))
    return tuple(out)


# -- timeline: unit-time simulation of the schedule ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Slot:
    rank: int
    action: Action
    start: float
    end: float


def timeline(pipe: Pipe, *, backward_cost: float = 1.0,
             cost: Callable[[int, Action], float] | None = None, hop: float = 0.0) -> list[Slot]:
    """When each compute action would run if a forward of one whole stage took one time
    unit (a chunk 1/v of it) and a backward ``backward_cost`` units; sends are free.
    With ``cost(rank, action)`` (seconds, the time model's) an action takes that long and
    an input from another rank arrives ``hop`` seconds after it was produced.

    An action starts when its rank is free and its input has arrived."""
    per = 1.0 / pipe.virtual
    orders = {r: [a for a in actions(pipe, r) if a.kind.compute] for r in range(pipe.pp)}
    done: dict[tuple[Kind, int, int], float] = {}
    clock = {r: 0.0 for r in range(pipe.pp)}
    pos = {r: 0 for r in range(pipe.pp)}
    slots: list[Slot] = []
    last = pipe.chunks - 1
    while any(pos[r] < len(orders[r]) for r in orders):
        moved = False
        for r in orders:
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                if a.kind is Kind.F:
                    deps = [(Kind.F, a.chunk - 1, a.microbatch)] if a.chunk else []
                else:
                    deps = [(Kind.F, a.chunk, a.microbatch)]
                    if a.chunk < last:
                        deps.append((Kind.B, a.chunk + 1, a.microbatch))
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] + (hop if pipe.rank_of(d[1]) != r else 0.0)
                                          for d in deps])
                end = start + (cost(r, a) if cost is not None else
                               per * (1.0 if a.kind is Kind.F else backward_cost))
                done[(a.kind, a.chunk, a.microbatch)] = end
                clock[r] = end
                slots.append(Slot(r, a, start, end))
                pos[r] += 1
                moved = True
        if not moved:  # torch's orders never deadlock; an internal invariant
            raise RuntimeError(f"the {pipe.schedule.value} action order deadlocks")
    return slots


def bubble_of(slots: Sequence[Slot], pp: int) -> float:
    """Idle fraction: 1 - busy time / (ranks * span)."""
    if not slots:
        return 0.0
    t0 = min(s.start for s in slots)
    span = max(s.end for s in slots) - t0
    busy = sum(s.end - s.start for s in slots)
    return 1.0 - busy / (pp * span) if span else 0.0


def bubble_theory(pipe: Pipe) -> float:
    """(p-1)/(m+p-1), divided by v when interleaved (DESIGN.md's oracle)."""
    p, m = pipe.pp, pipe.microbatches
    return (p - 1) / (m + p - 1) / pipe.virtual


def gantt_rows(pipe: Pipe, slots: Sequence[Slot] | None = None, *,
               width: int = 2) -> list[str]:
    """A text Gantt chart: one row per pipeline rank, one cell per time slot of a chunk's
    forward (``F`` + microbatch, backward lower-case), ``.`` where the rank idles."""
    slots = list(slots) if slots is not None else timeline(pipe)
    unit = 1.0 / pipe.virtual
    n = round(max(s.end for s in slots) / unit)
    rows: list[str] = []
    for r in range(pipe.pp):
        cells = ["." * width] * n
        for s in slots:
            if s.rank != r:
                continue
            label = f"{'F' if s.action.kind is Kind.F else 'b'}{s.action.microbatch}"
            for t in range(round(s.start / unit), round(s.end / unit)):
                cells[t] = label[:width].ljust(width)
        rows.append(f"pp={r} |" + "|".join(cells) + "|")
    return rows


def describe_pipe(pipe: Pipe, n_layers: int, stack: str) -> dict[str, object]:
    """The pipeline as data (``explain --json``'s ``"pipeline"``, and the printer's)."""
    slots = timeline(pipe)
    return {
        "schedule": pipe.schedule.value, "pp": pipe.pp, "virtual_stages": pipe.virtual,
        "microbatches": pipe.microbatches, "stack": stack,
        "layers": {str(r): [list(pipe.layers_of(c, n_layers)) for c in pipe.chunks_of(r)]
                   for r in range(pipe.pp)},
        "bubble": {"theory": bubble_theory(pipe), "scheduled": bubble_of(slots, pipe.pp)},
        "gantt": gantt_rows(pipe, slots),
    }


# -- the layer stack --------------------------------------------------------------------------
def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The module the model marked with the logical axis ``layers``, and its path."""
    for name, mod in model.named_modules():
        if sl.logical_axes(mod) == ("layers",):
            if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
                raise sl.ShardingError(
                    f"{name or type(model).__name__} is marked 'layers' but is a "
                    f"{type(mod).__name__}; mark the nn.ModuleList (or nn.Sequential) of layers")
            return name, mod
    return None


def hidden_key(kwargs: dict) -> str:
    """Which keyword carries the hidden state when a layer is called by keyword only."""
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))


def microbatch_rows(n: int, ways: int, microbatches: int) -> torch.Tensor:
    """Row order that makes microbatch ``j`` the contiguous rows ``j*n/m ...``: on each of
    the ``ways`` batch shards, its own ``j``-th chunk (as torch's schedules split each
    rank's local batch)."""
    b = n // (ways * microbatches)
    return torch.arange(n).view(ways, microbatches, b).transpose(0, 1).reshape(n)
