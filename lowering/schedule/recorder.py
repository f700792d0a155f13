"""The recorder: a ``TorchDispatchMode`` that logs every collective one rank issues (and,
when asked, the compute of every other op: FLOPs and bytes per phase, for the prediction).

It sees every functional collective DTensor and our explicit collectives issue
(DTensor-level ops are handed back with ``NotImplemented`` so DTensor desugars them into
collectives first, which then come back through the mode), and logs each as a
:class:`~lowering.schedule.records.Record` with its phase, module site, mesh axis and
payload. It works the same in dry, simulate and run mode, which is why the three record
one schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor

from lowering._torch import (TorchDispatchMode, in_backward, is_functional_collective,
                             is_higher_order, module_tracker, op_name, tracker_snapshot)
from lowering.schedule.fusion import Fusion
from lowering.schedule.op_cost import op_cost
from lowering.schedule.records import Cost, Op, Phase, Record

__all__ = ["COLLECTIVES", "Recorder", "CollectiveCheck", "site", "logical", "running_module"]


def running_module(parents: Iterable[str]) -> str:
    """The module path a collective is attributed to, from a module tracker's running
    modules (``"Global"`` and ``"TinyLlama.layers.1.k_proj"`` style names): the deepest
    one, or when several at that depth run at once (k and v projections' backward), the
    module holding them all. Deterministic, whatever order the set iterates in."""
    names = [p.partition(".")[2] for p in parents if p != "Global" and "." in p]
    if not names:
        return ""
    depth = max(n.count(".") for n in names)
    deepest = sorted({n for n in names if n.count(".") == depth})
    if len(deepest) == 1:
        return deepest[0]
    common = deepest[0].split(".")
    for n in deepest[1:]:
        parts = n.split(".")
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


class CollectiveCheck(Protocol):
    """Run mode's check of a collective across its group, before it is issued
    (:class:`lowering.run.guard.CollectiveGuard`)."""

    def verify(self, group_name: str, sig: dict) -> None: ...


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


#: the functional collectives (op names) that move data: each is one record
COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_", "all_gather_into_tensor", "reduce_scatter_tensor",
    "all_to_all_single", "broadcast", "broadcast_",
})


class Recorder(TorchDispatchMode):
    """Records functional collectives with phase, module site, mesh axis and payload.

    ``group_axes`` maps a process-group name to its mesh axis (and the group size).
    """

    _RECORDED = COLLECTIVES

    def __init__(self, group_axes: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        self.group_axes = dict(group_axes)
        self.records: list[Record] = []
        self._tracker = module_tracker()
        self._override: list[tuple[Op, tuple[int, ...] | None, int]] = []
        self._site: list[str] = []
        self._phase: list[Phase] = []
        self.guard: CollectiveCheck | None = None  # run mode's collective check
        self._paused = 0
        #: with ``count_compute`` (dry mode's prediction): this rank's compute per phase
        self.count_compute = False
        self._compute: dict[Phase, Cost] = {}
        self._fusion = Fusion()

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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Collectives in the block are not part of the schedule (reading a loss value)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def add(self, record: Record) -> None:
        """Append a record made by the caller (pipeline sends and receives)."""
        self.records.append(record)

    def snapshot(self) -> Callable[[], None]:
        """Remember which modules are running; the returned function restores that
        (after a forward left early, as a pipeline chunk that is not the last does)."""
        return tracker_snapshot(self._tracker)

    def current_site(self) -> str:
        if self._site:
            return self._site[-1]
        return running_module(self._tracker.parents) or "(model)"

    def current_phase(self) -> Phase:
        if self._phase:
            return self._phase[-1]
        return Phase.BACKWARD if in_backward() else Phase.FORWARD

    # -- dispatch -------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if is_higher_order(func):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into collectives first
        if is_functional_collective(func):
            name = op_name(func)
            if name in self._RECORDED and not self._paused:
                self._record(name, args)
            if self.count_compute:
                self._fusion.consume((args, kwargs))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.count_compute and not self._paused and not types:  # plain tensors only:
            # a subclass here (DTensor's FakeTensor sharding propagation) is not compute
            flops, nbytes, attention = op_cost(func, args, kwargs, out)
            ph = self.current_phase()
            self._fusion.op(func, args, kwargs, out, fuses=not flops, eager_bytes=nbytes,
                            phase=ph)
            if flops or nbytes:
                self._add(ph, Cost(flops, nbytes, flops if attention else 0,
                                   flops / 2 if attention == "causal" else 0, 0.0))
        return out

    def skipped_attention(self, flops: float) -> None:
        """Count ``flops`` of attention a kernel leaves out (ring attention's masked
        blocks) in the model's FLOPs, at no time (dry mode's prediction only)."""
        if self.count_compute and not self._paused and flops:
            self._add(self.current_phase(), Cost(flops, 0.0, flops, flops, 0.0))

    def _add(self, phase: Phase, cost: Cost) -> None:
        self._compute[phase] = self._compute.get(phase, Cost(fused_bytes=0.0)) + cost

    @property
    def compute(self) -> dict[Phase, Cost]:
        """This rank's compute per phase so far; fused bytes of tensors still pending are
        counted as written (a boundary: :meth:`lowering.schedule.fusion.Fusion.flush`)."""
        self._fusion.flush()
        for ph, n in self._fusion.bytes.items():
            self._add(ph, Cost(fused_bytes=n))
        self._fusion.bytes.clear()
        return self._compute

    def compute_total(self) -> Cost:
        return sum(self.compute.values(), Cost(fused_bytes=0.0))

    def add_compute(self, phase: Phase, cost: Cost) -> None:
        """Add a replayed action's compute (a dry pipeline traces one microbatch)."""
        self.compute  # noqa: B018  (settle the fused bytes first)
        self._add(phase, cost)

    def _record(self, name: str, args: Sequence[object]) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor):  # torch's functional collectives' signature
            raise TypeError(f"functional collective {name} got {type(x).__name__} first, "
                            "not a tensor: a torch version this recorder does not know")
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
