"""Schedule records: the collectives one rank issues in one training step, as data.

A :class:`Record` is one collective as one rank sees it (phase, site, op, mesh axis,
shape, dtype, payload and the bytes it puts on the wire); :func:`totals` sums them per
axis and per phase; :func:`schedule_json` is ``explain --json``'s object. The recorder
that makes records is :mod:`lowering.schedule.recorder`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import shardlang as sl
from shardlang.errors import Choice

__all__ = ["Phase", "Op", "Record", "Cost", "RankSchedules", "wire_bytes", "schedule_json", "totals"]


class Phase(Choice, what="phase", keyword="phase", flag="--phase"):
    """Which part of a training step a collective belongs to."""

    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


@dataclass(frozen=True)
class Cost:
    """Compute one rank spends in part of a step, counted on its own tensors (dry mode):
    ``flops`` of ops with a FLOP formula (matmuls, fused attention; a causal mask not
    discounted, as the usual 6ND-style counts do), of which ``attention_flops`` in fused
    attention kernels and ``skipped_flops`` the part of those a kernel does not run (half
    of a causal kernel's; the masked blocks ring attention leaves out), and ``bytes`` read and written by the other ops (elementwise, norms,
    copies, the optimizer's updates; views and allocations are free), each op on its own
    as eager PyTorch runs it; ``fused_bytes`` those that reach memory when chains of such
    ops are fused (:mod:`lowering.schedule.fusion`; ``None``: the same as ``bytes``)."""

    flops: float = 0.0
    bytes: float = 0.0
    attention_flops: float = 0.0
    skipped_flops: float = 0.0
    fused_bytes: float | None = None

    def _fields(self) -> tuple[float, float, float, float, float]:
        return (self.flops, self.bytes, self.attention_flops, self.skipped_flops,
                self.bytes if self.fused_bytes is None else self.fused_bytes)

    def memory_bytes(self, fused: bool) -> float:
        """The bytes a stack that fuses (or runs every op eagerly) moves."""
        return self._fields()[4] if fused else self.bytes

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(self._fields(), other._fields())))

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(a - b for a, b in zip(self._fields(), other._fields())))

    def scaled(self, k: float) -> Cost:
        return Cost(*(a * k for a in self._fields()))


class Op(enum.Enum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    PERMUTE = "permute"
    SEND = "send"
    RECV = "recv"
    BROADCAST = "broadcast"


def wire_bytes(op: Op, payload: int, n: int) -> float:
    """Bytes this rank sends for one collective of ``payload`` bytes over ``n`` ranks.

    Ring formulas: all-reduce 2(n-1)/n*S; all-gather, reduce-scatter, all-to-all and
    broadcast (n-1)/n*S; a permute or send S; a recv 0.
    """
    if op is Op.ALL_REDUCE:
        return 2 * (n - 1) * payload / n
    if op in (Op.ALL_GATHER, Op.REDUCE_SCATTER, Op.ALL_TO_ALL, Op.BROADCAST):
        return (n - 1) * payload / n
    return 0.0 if op is Op.RECV else float(payload)


@dataclass(frozen=True, slots=True)
class Record:
    """One collective as one rank sees it. ``group`` is filled per rank (see :meth:`json`)."""

    index: int
    phase: Phase
    site: str
    op: Op
    axis: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    group_size: int
    peer_shift: int = 0  # permute/send/recv: the peer's offset along the axis

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.op, self.bytes, self.group_size)

    def signature(self) -> tuple[object, ...]:
        """What must agree between ranks and modes: op, axis, shape, dtype, phase, order."""
        return (self.index, self.phase.value, self.op.value, self.axis, self.shape, self.dtype)

    def json(self, mesh: sl.Mesh, rank: int) -> dict[str, object]:
        group = list(mesh.group(rank, self.axis))
        if self.op in (Op.PERMUTE, Op.SEND, Op.RECV):
            me = group.index(rank)
            group = [rank, group[(me + self.peer_shift) % len(group)]]
        wb = self.wire_bytes
        return {
            "index": self.index, "phase": self.phase.value, "site": self.site,
            "op": self.op.value, "axis": self.axis, "group": group,
            "shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes,
            "wire_bytes": int(wb) if wb == int(wb) else wb,
        }


def totals(records: Sequence[Record]) -> dict[str, dict[str, dict[str, float]]]:
    """Sum ``bytes`` and ``wire_bytes`` per mesh axis and per phase."""
    out: dict[str, dict[str, dict[str, float]]] = {"axis": {}, "phase": {}}
    for r in records:
        for key, name in (("axis", r.axis), ("phase", r.phase.value)):
            slot = out[key].setdefault(name, {"count": 0, "bytes": 0, "wire_bytes": 0.0})
            slot["count"] += 1
            slot["bytes"] += r.bytes
            slot["wire_bytes"] += r.wire_bytes
    return out


@dataclass
class RankSchedules:
    """Every asked-for rank's records, for JSON and the printer."""

    mesh: sl.Mesh
    model: dict[str, object]
    ranks: dict[int, list[Record]] = field(default_factory=dict)


def schedule_json(s: RankSchedules, *, analytic: Mapping[str, object] | None = None) -> dict:
    """The ``explain --json`` object of DESIGN.md."""
    ranks = {str(r): [rec.json(s.mesh, r) for rec in recs] for r, recs in s.ranks.items()}
    first = next(iter(s.ranks.values()), [])
    out: dict[str, object] = {
        "mesh": s.mesh.shape, "world_size": s.mesh.size, "model": s.model,
        "ranks": ranks, "totals": totals(first),
    }
    if analytic is not None:
        out["analytic"] = analytic
    return out
