"""What ``shardlang bench`` measures besides wall time: time in collectives per mesh
axis, compute time, model FLOPs, peak memory, and a merged Chrome/Perfetto trace.

* Collectives: a dispatch mode times, on this rank's main thread, every functional
  collective's issue and every ``wait_tensor`` (where the time goes when the
  communication is not hidden behind compute), and attributes both to the mesh axis of
  the collective's process group. c10d ops (a pipeline's sends and receives) count
  their issue only: the pipeline's waiting shows in its measured bubble.
* Compute: torch.profiler's top-level operators on the main thread (their CPU time; on
  CUDA, the kernels' device time), collectives excluded. What is left of the step is
  Python and framework overhead.
* FLOPs: ``torch.utils.flop_counter`` over one forward and backward of the global batch
  on meta tensors (matmuls, attention, convolutions: what torch counts).
* Memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); on CPU the
  process's peak resident set size (``ru_maxrss``), which includes Python and torch.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowering._torch import (TorchDispatchMode, is_functional_collective, is_wrapper_subclass,
                             op_name)
from lowering.plan import KnownValues

__all__ = ["CollectiveTimer", "compute_seconds", "model_flops", "peak_memory",
           "merge_traces"]


class CollectiveTimer(TorchDispatchMode):
    """Seconds this thread spends issuing and waiting for collectives, per mesh axis."""

    def __init__(self, group_axes: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        self.group_axes = dict(group_axes)
        self.seconds: dict[str, float] = defaultdict(float)
        self._axis_of: dict[int, str] = {}
        self._thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if any(is_wrapper_subclass(t) for t in types):
            return NotImplemented  # DTensor and waiting tensors unwrap, then come back here
        name = op_name(func) if hasattr(func, "_opname") else ""
        c10d = getattr(func, "namespace", "") == "c10d"
        if threading.get_ident() != self._thread or name in _NOT_COMMUNICATION or not (
                is_functional_collective(func) or c10d):
            return func(*args, **kwargs)
        if name == "wait_tensor":
            # a wait on a tensor we did not see issued (a view of it): the oldest pending;
            # none pending: a second wait on a finished collective, nothing to time
            key = id(args[0]) if id(args[0]) in self._axis_of else next(iter(self._axis_of), None)
            if key is None:
                return func(*args, **kwargs)
            axis = self._axis_of.pop(key)
        else:
            axis = self._axis(args, c10d)
        with torch.profiler.record_function(f"{axis} {name}"):
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.seconds[axis] += time.perf_counter() - t0
        if isinstance(out, torch.Tensor) and name != "wait_tensor":
            self._axis_of[id(out)] = axis
        return out

    def _axis(self, args: tuple, c10d: bool) -> str:
        for a in args:
            key = str(a) if isinstance(a, str) else getattr(a, "group_name", None)
            if key is not None and key in self.group_axes:
                return self.group_axes[key][0]
        return "pp" if c10d else "?"


def compute_seconds(prof: torch.profiler.profile, *, cuda: bool) -> float:
    """Outermost operator time on the main thread (CUDA: kernel time), collectives out.

    An operator counts when no enclosing event is an operator too (wrappers such as a
    dispatch mode's own event are looked through); a collective inside an operator (DTensor
    redistributing) is taken out of it."""
    total = nested = 0.0
    events = prof.events()
    if cuda:
        return sum(e.self_device_time_total / 1e6 for e in events
                   if e.device_type.name == "CUDA")
    # the profiler numbers threads itself: the main thread runs most operators (on CPU
    # the backward runs there too)
    threads = Counter(e.thread for e in events if _is_op(e))
    mine = threads.most_common(1)[0][0] if threads else None
    for e in events:
        if e.thread != mine:
            continue
        seconds = (e.time_range.end - e.time_range.start) / 1e6
        outer = _outer_op(e)
        if _is_collective(e) and outer is not None and not _in_collective(e):
            nested += seconds  # the outermost collective event only (c10d's own nest in it)
        elif _is_op(e) and not _is_collective(e) and outer is None:
            total += seconds
    return max(total - nested, 0.0)


_AXES = ("dp", "tp", "sp", "ep", "pp", "?")
_NOT_COMMUNICATION = {"_wrap_tensor_autograd"}  # a functional collective's autograd helper
_OPS = ("aten::", "autograd::", "Optimizer.", "torch::autograd")


def _is_op(e) -> bool:  # noqa: ANN001
    return e.name.startswith(_OPS)


def _is_collective(e) -> bool:  # noqa: ANN001
    return e.name.split(" ")[0] in _AXES or "c10d" in e.name


def _in_collective(e) -> bool:  # noqa: ANN001
    p = e.cpu_parent
    while p is not None:
        if _is_collective(p):
            return True
        p = p.cpu_parent
    return False


def _outer_op(e):  # noqa: ANN001, ANN202
    """The nearest enclosing operator event of ``e`` (None: it is outermost)."""
    p = e.cpu_parent
    while p is not None and not _is_op(p):
        p = p.cpu_parent
    return p


def model_flops(build_meta, batch: int, seq: int, vocab: int) -> float:  # noqa: ANN001
    """FLOPs of one training step (forward and backward) of the whole global batch."""
    model = build_meta()
    idx = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    # KnownValues answers the data-dependent questions model code asks of meta tensors
    # (Hugging Face's mask code calls .all() on positions), as dry mode does
    with FlopCounterMode(display=False) as counter, KnownValues():
        out = model(idx)
        logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
        logits.float().sum().backward()
    return float(counter.get_total_flops())


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS (ru_maxrss)"


def merge_traces(traces: Mapping[int, str], path: str) -> None:
    """One Chrome/Perfetto trace (ui.perfetto.dev) with one process per rank."""
    events: list[dict] = []
    for rank, text in sorted(traces.items()):
        data = json.loads(text)
        for e in data.get("traceEvents", []):
            if isinstance(e, dict):
                e["pid"] = rank
                events.append(e)
        events.append({"ph": "M", "name": "process_name", "pid": rank,
                       "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank,
                       "args": {"sort_index": rank}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
