"""``shardlang bench`` inside a torchrun worker: shardlang's built-in loop and the
hand-written baseline in one launch, one step each in turn.

Per step, shardlang's step is timed by the loop (this rank's wall clock), then the
baseline's step runs and is timed; a step's time is the slowest rank's. After
``warmup`` steps of each, ``steps`` are measured, then one more shardlang step runs under
torch.profiler and the collective timer (:mod:`.measure`) for the breakdown: time per
mesh axis, compute, and what is left (Python and framework). That step is not in the
medians.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lowering.bench.baselines import Baseline, baseline_for, no_baseline_reason
from lowering.bench.measure import (CollectiveTimer, compute_seconds, merge_traces,
                                    model_flops, peak_memory)
from lowering.run.modes import Layout, train_layout
from lowering.run.session import Mode, Session, group_axes
from lowering.run.train import Step
from models.datasets import ArithmeticSequences

__all__ = ["bench_layout"]


@dataclass
class _Rank:
    """What one rank measured."""

    shardlang: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    axis_s: dict[str, float] = field(default_factory=dict)
    compute_s: float = 0.0
    profiled_s: float = 0.0
    memory: int = 0
    memory_kind: str = ""
    losses: list[float] = field(default_factory=list)        # shardlang, every step
    base_losses: list[float] = field(default_factory=list)   # the baseline, every step
    trace: str | None = None


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_layout(layout: Layout, *, steps: int = 10, warmup: int = 3, baseline: bool = False,
                 trace: bool = False, lr: float = 3e-3) -> dict | None:
    """Measure ``layout`` (and its baseline); rank 0 gets the layout's JSON entry."""
    total = warmup + steps + 1  # the last step is the profiled one
    profiled = total - 1
    mine = _Rank()
    state: dict[str, object] = {}

    def watch(models: dict, sess: Session) -> None:
        model = next(iter(models.values()))
        batch, seq = layout.shapes(model)
        state.update(sess=sess, batch=batch, seq=seq, device=sess.device,
                     vocab=layout.model.vocab_size(model))
        meta = layout.model.build(seed=layout.seed, meta=True)
        plan = layout.plan(meta)
        state["no_baseline"] = no_baseline_reason(plan, meta) if baseline else None
        if baseline and state["no_baseline"] is None:
            state["baseline"] = baseline_for(
                plan, lambda: layout.model.build(seed=layout.seed), lr=lr, batch=batch,
                rank=sess.rank, device=sess.device)

    data_holder: dict[str, ArithmeticSequences] = {}

    def on_step(s: Step) -> None:
        sess: Session = state["sess"]  # type: ignore[assignment]
        if s.index == profiled:  # the last step: gather while the process group lives
            _stop(state, mine, sess, trace)
            mine.memory, mine.memory_kind = peak_memory(sess.device)
            everyone: list[_Rank | None] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            state["ranks"] = [r for r in everyone if r is not None]
            _release(state)
            return
        if s.index >= warmup:
            mine.shardlang.append(s.seconds)
        mine.losses.append(s.losses[0])
        base: Baseline | None = state.get("baseline")  # type: ignore[assignment]
        if base is not None:
            data = data_holder.setdefault("d", ArithmeticSequences(int(state["vocab"])))
            idx, tgt = data.batch(s.index, int(state["batch"]), int(state["seq"]))
            if sess.device != "cpu":
                idx, tgt = idx.to(sess.device), tgt.to(sess.device)
            _sync(sess)
            t0 = time.perf_counter()
            # the global loss, as shardlang's loop reports it every step: same work
            mine.base_losses.append(base.mean_loss(base.step(idx, tgt)))
            _sync(sess)
            if s.index >= warmup:
                mine.baseline.append(time.perf_counter() - t0)
        if s.index + 1 == profiled:
            _start(state, sess)

    result, _ = train_layout(layout, Mode.RUN, steps=total, lr=lr, on_step=on_step, watch=watch)
    sess: Session = state["sess"]  # type: ignore[assignment]
    if sess.rank != 0:
        return None
    return _entry(layout, state["ranks"], state, result.bubble)  # type: ignore[arg-type]


def _release(state: dict) -> None:
    """Free the baseline (its DDP/FSDP2 modules hold the process groups) and the profiler
    while the process group lives, not after ``destroy_process_group`` or at interpreter
    exit (the suspect, not reproduced in 18 launches here, of one CI abort: ``terminate
    called without an active exception``, SIGABRT, after the profiled step)."""
    base = state.pop("baseline", None)
    if base is not None:
        state["baseline_name"] = base.name
    for key in ("prof", "timer"):
        state.pop(key, None)
    del base
    gc.collect()


def _sync(sess: Session) -> None:
    if sess.device.startswith("cuda"):
        torch.cuda.synchronize()


def _start(state: dict, sess: Session) -> None:
    timer = CollectiveTimer(group_axes(sess))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if sess.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.__enter__()
    timer.__enter__()
    state.update(timer=timer, prof=prof, t0=time.perf_counter())


def _stop(state: dict, mine: _Rank, sess: Session, trace: bool) -> None:
    timer: CollectiveTimer = state["timer"]
    prof = state["prof"]
    _sync(sess)
    mine.profiled_s = time.perf_counter() - state["t0"]
    timer.__exit__(None, None, None)
    prof.__exit__(None, None, None)
    mine.axis_s = dict(timer.seconds)
    mine.compute_s = compute_seconds(prof, cuda=sess.device.startswith("cuda"))
    if trace:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            mine.trace = open(f.name).read()


def _entry(layout: Layout, ranks: list[_Rank], state: dict, bubble: list[float]) -> dict:
    n = min(len(r.shardlang) for r in ranks)
    step = [max(r.shardlang[i] for r in ranks) for i in range(n)]
    med = statistics.median(step)
    batch, seq = int(state["batch"]), int(state["seq"])
    flops = model_flops(lambda: layout.model.build(seed=layout.seed, meta=True), batch, seq, 0)
    r0 = ranks[0]
    axes = sorted({a for r in ranks for a in r.axis_s})
    out: dict = {
        "mesh": str(layout.mesh), "fsdp": layout.options.fsdp,
        "precision": str(layout.options.precision), "batch": batch, "seq": seq,
        "steps": n, "step_s": _spread(step), "tokens_per_s": batch * seq / med,
        "flops_per_step": flops, "tflops": flops / med / 1e12,
        "tflops_per_rank": flops / med / 1e12 / layout.mesh.size, "mfu": None,
        # bytes per rank (keyed like explain's "memory"), and what was measured
        "peak_memory": {str(i): r.memory for i, r in enumerate(ranks)},
        "peak_memory_kind": r0.memory_kind,
        # the profiled step: rank 0's time per axis, compute, and the rest
        "axis_s": {a: r0.axis_s.get(a, 0.0) for a in axes},
        "compute_s": r0.compute_s, "profiled_step_s": r0.profiled_s,
        "other_s": max(r0.profiled_s - r0.compute_s - sum(r0.axis_s.values()), 0.0),
        "bubble": statistics.median(bubble) if bubble else None,
        # rank 0's loss per step: the baseline trains the same model on the same batches
        "losses": {"shardlang": r0.losses, "baseline": r0.base_losses or None},
    }
    base: str | None = state.get("baseline_name")
    if base is not None:
        m = min(len(r.baseline) for r in ranks)
        bstep = [max(r.baseline[i] for r in ranks) for i in range(m)]
        bmed = statistics.median(bstep)
        out["baseline"] = {"name": base, "step_s": _spread(bstep), "ratio": med / bmed}
    else:
        out["baseline"] = None
        if state.get("no_baseline"):
            out["baseline_note"] = state["no_baseline"]
    if any(r.trace for r in ranks):
        out["_traces"] = {i: r.trace for i, r in enumerate(ranks) if r.trace}
    return out


def write_trace(entry: dict, path: str) -> None:
    """Write the merged per-rank trace of ``entry``'s profiled step to ``path``."""
    merge_traces(entry.pop("_traces", {}), path)
