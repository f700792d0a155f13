"""Schedule records: the collectives one rank issues in one training step.

The :class:`Recorder` is a ``TorchDispatchMode`` that sees every functional collective
DTensor and our explicit collectives issue (DTensor-level ops are handed back with
``NotImplemented`` so DTensor desugars them into collectives first, which then come
back through the mode). It works the same in dry, simulate and run mode.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import shardlang as sl
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from lowering.guard import CollectiveGuard

from lowering._torch import ModTracker, in_backward

__all__ = [
    "Phase", "Op", "Record", "Recorder", "RankSchedules", "wire_bytes", "schedule_json", "totals",
    "site", "logical",
]


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Recorder(TorchDispatchMode):
    """Records functional collectives with phase, module site, mesh axis and payload.

    ``group_axes`` maps a process-group name to its mesh axis (and the group size).
    """

    _RECORDED = {
        "all_reduce", "all_reduce_", "all_gather_into_tensor", "reduce_scatter_tensor",
        "all_to_all_single", "broadcast", "broadcast_",
    }

    def __init__(self, group_axes: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        self.group_axes = dict(group_axes)
        self.records: list[Record] = []
        self._tracker = ModTracker()
        self._override: list[tuple[Op, tuple[int, ...] | None, int]] = []
        self._site: list[str] = []
        self._phase: list[Phase] = []
        self.guard: CollectiveGuard | None = None  # run mode's collective check

    # -- context --------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[Recorder]:
        _RECORDING.append(self)
        try:
            with self._tracker, self:
                yield self
        finally:
            _RECORDING.pop()

    @contextlib.contextmanager
    def site(self, name: str, phase: Phase | None = None) -> Iterator[None]:
        """Attribute collectives issued in the block to ``name`` (and ``phase``)."""
        self._site.append(name)
        if phase is not None:
            self._phase.append(phase)
        try:
            yield
        finally:
            self._site.pop()
            if phase is not None:
                self._phase.pop()

    @contextlib.contextmanager
    def explicit(self, op: Op, *, shift: int = 0,
                 shape: tuple[int, ...] | None = None) -> Iterator[None]:
        """Record the collectives issued in the block as ``op`` (e.g. a permute built
        from an all-to-all), with the logical ``shape`` of the payload where c10d's own
        buffer differs (it gathers and scatters along dim 0 only)."""
        self._override.append((op, shape, shift))
        try:
            yield
        finally:
            self._override.pop()

    def add(self, record: Record) -> None:
        """Append a record made by the caller (pipeline sends and receives)."""
        self.records.append(record)

    def snapshot(self) -> Callable[[], None]:
        """Remember which modules are running; the returned function restores that
        (after a forward left early, as a pipeline chunk that is not the last does)."""
        parents = set(self._tracker.parents)
        counts = dict(self._tracker._active_module_cnt)

        def restore() -> None:
            self._tracker.parents = set(parents)
            self._tracker._active_module_cnt = dict(counts)
        return restore

    def current_site(self) -> str:
        if self._site:
            return self._site[-1]
        names = [p for p in self._tracker.parents if p != "Global"]
        if not names:
            return "(model)"
        deepest = max(names, key=lambda p: (p.count("."), len(p)))
        return deepest.partition(".")[2] or "(model)"

    def current_phase(self) -> Phase:
        if self._phase:
            return self._phase[-1]
        return Phase.BACKWARD if in_backward() else Phase.FORWARD

    # -- dispatch -------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into collectives first
        if func.namespace == "_c10d_functional":
            name = func._opname
            if name in self._RECORDED:
                self._record(name, args)
        return func(*args, **kwargs)

    def _record(self, name: str, args: Sequence[object]) -> None:
        x = args[0]
        assert isinstance(x, torch.Tensor), "functional collectives take a tensor first"
        group_name = args[-1]
        axis, n = self.group_axes.get(str(group_name), ("?", 1))
        shape, nbytes = tuple(x.shape), _nbytes(x)
        if name == "all_gather_into_tensor":
            shape = (shape[0] * n, *shape[1:]) if shape else (n,)
            nbytes *= n
        op = {
            "all_reduce": Op.ALL_REDUCE, "all_reduce_": Op.ALL_REDUCE,
            "all_gather_into_tensor": Op.ALL_GATHER, "reduce_scatter_tensor": Op.REDUCE_SCATTER,
            "all_to_all_single": Op.ALL_TO_ALL, "broadcast": Op.BROADCAST,
            "broadcast_": Op.BROADCAST,
        }[name]
        shift = 0
        if self._override:
            want, logical, shift = self._override[-1]
            if logical is None:
                op = want  # a permute built from an all-to-all: relabel the op
            elif want is op and _numel(logical) * x.element_size() == nbytes:
                shape = logical  # the same collective, shown in its logical shape
        rec = Record(
            index=len(self.records), phase=self.current_phase(), site=self.current_site(),
            op=op, axis=axis, shape=shape, dtype=_dtype(x), bytes=nbytes, group_size=n,
            peer_shift=shift,
        )
        if self.guard is not None:  # run mode: the group agrees before anyone issues it
            self.guard.verify(str(group_name), {
                "op": op.value, "axis": axis, "shape": list(shape), "dtype": rec.dtype,
                "phase": rec.phase.value, "site": rec.site})
        self.records.append(rec)


_RECORDING: list[Recorder] = []


@contextlib.contextmanager
def site(name: str) -> Iterator[None]:
    """Attribute collectives in the block to ``name`` if a recorder is recording."""
    if not _RECORDING:
        yield
        return
    with _RECORDING[-1].site(name):
        yield


@contextlib.contextmanager
def logical(op: Op, shape: Sequence[int]) -> Iterator[None]:
    """Record the block's collective as ``op`` with this logical payload shape."""
    if not _RECORDING:
        yield
        return
    with _RECORDING[-1].explicit(op, shape=tuple(shape)):
        yield


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
