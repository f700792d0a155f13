"""``shardlang plan``: which layout, and will it fit — searched before launch.

1. One single-device dry trace of one row gives the model's profile
   (:class:`lowering.plan.search.ModelProfile`: compute per row, activations per row,
   parameters, layers, width).
2. Every layout of ``world`` ranks (:func:`lowering.plan.search.candidates`) gets a
   formula estimate of its step time and memory; those that do not fit are dropped.
3. The best by estimate are traced in dry mode one by one (``explain``, exact schedule and
   memory) until ``top`` of them fit and the time budget is spent (or all are traced);
   the traced ones are ranked by the traced prediction, the one ``explain --device``
   prints, so ``plan`` and ``explain`` always agree on the order.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.pool
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import shardlang as sl
from lowering.plan import Device, Memory, Predicted, Recompute, StackCost, human, layer_stack
from lowering.plan.search import Candidate, ModelProfile, candidates, divisors_of, estimate
from lowering.run import Layout, explain
from lowering.schedule import Cost

__all__ = ["Found", "Search", "search", "profile"]


@dataclass
class Found:
    candidate: Candidate
    predicted: Predicted
    memory: Memory          # the busiest traced rank's bytes
    memory_rank: int
    estimate_s: float

    def json(self) -> dict[str, object]:
        c = self.candidate
        return {"mesh": ",".join(f"{a}={n}" for a, n in c.mesh.shape.items()) or "dp=1",
                "fsdp": c.fsdp, "microbatches": c.microbatches, "schedule": c.schedule,
                "virtual": c.virtual, "recompute": c.recompute, "rules": c.rules,
                "memory": {**self.memory.json(), "rank": self.memory_rank},
                "predicted": self.predicted.json(), "why": self.predicted.why,
                "estimate_s": self.estimate_s}


def seq_tp_rule(rules: sl.Rules) -> str:
    """The rule that adds tp to ``norm_seq`` (Megatron's sequence parallelism) on top of
    ``rules``; empty where it is there already or ``norm_seq`` has no rule to extend."""
    entry = rules.mesh_entry("norm_seq")
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    if not axes or "tp" in axes:
        return ""
    return "norm_seq=" + "+".join((*axes, "tp"))


@dataclass
class Search:
    world: int
    found: list[Found] = field(default_factory=list)
    considered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    no_fit: int = 0
    traced: int = 0
    seconds: float = 0.0


def _hidden(model: nn.Module) -> int:
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise sl.ShardingError("plan: the model has no nn.Embedding, so its width is unknown; "
                               "plan searches layouts of language models")
    return emb.embedding_dim


def _heads(model: nn.Module) -> int:
    for obj in (getattr(model, "config", None), *model.modules()):
        for name in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
            v = getattr(obj, name, None) or getattr(getattr(obj, "cfg", None), name, None)
            if isinstance(v, int) and v > 0:
                return v
    return 0


def _experts(model: nn.Module) -> tuple[int, int]:
    """(experts per layer, parameters in experts) from the ``experts`` logical axis."""
    n = count = 0
    for p in model.parameters():
        axes = sl.logical_axes(p) or ()
        if "experts" in axes:
            n = p.shape[list(axes).index("experts")]
            count += p.numel()
    return n, count


def profile(layout: Layout) -> ModelProfile:
    """One row of the global batch traced on one device (meta tensors)."""
    one = Layout(layout.model, sl.Mesh(), layout.rules, layout.options, layout.seed, batch=1,
                 fsdp=False, microbatches=None, schedule=None, virtual=None,
                 recompute="none")
    model = layout.model.build(seed=layout.seed, meta=True)
    batch, seq = layout.shapes(model)
    ex = explain(one)
    stack = layer_stack(model)
    experts, expert_params = _experts(model)
    c = ex.compute[0]
    st = ex.stack.get(0, {}).get(0, StackCost())
    dtype = torch.bfloat16 if layout.options.precision.value == "bf16" else torch.float32
    inside = sum(p.numel() for p in stack[1].parameters()) if stack else 0
    n_inside = len(list(stack[1].parameters())) if stack else 0
    in_stack = {id(p) for p in stack[1].parameters()} if stack else set()
    head = max((p.numel() for p in model.parameters() if id(p) not in in_stack), default=0)
    return ModelProfile(
        params=ex.plan.n_params, outside_params=ex.plan.n_params - inside,
        tensors=len(list(model.parameters())),
        outside_tensors=len(list(model.parameters())) - n_inside, head_numel=head,
        expert_params=expert_params, experts=experts,
        layers=len(stack[1]) if stack else 1, hidden=_hidden(model), heads=_heads(model),
        batch=batch, seq=seq, forward=c[("F", 0)], backward=c[("B", 0)],
        optimizer=c.get(("O", 0), Cost()), activations=ex.memory[0].activations,
        compute_bytes=torch.empty((), dtype=dtype).element_size(),
        stack_forward=st.forward, stack_saved=st.saved, stack_inputs=st.inputs,
        layer_saved=st.largest, norm_seq="norm_seq" in ex.plan.trace.names)


def search(layout: Layout, world: int, dev: Device, *, top: int = 3,
           gpus_per_node: int | None = None, budget_s: float = 45.0,
           recompute: str = "auto") -> Search:
    """The ``top`` layouts of ``world`` ranks for ``layout``'s model, batch, seq and
    precision on ``dev``, best first (module docstring). Traces continue past ``top``
    until ``budget_s`` seconds have passed in all (or every candidate is traced).
    ``recompute``: ``auto`` (none, and full where a layout does not fit without it),
    or one of ``none``, ``selective``, ``full`` for every layout."""
    modes = _recompute_modes(recompute)
    t0 = time.perf_counter()
    g = gpus_per_node or dev.gpus_per_node
    prof = profile(layout)
    precision = layout.options.precision.value
    cands, dropped = candidates(world, prof, gpus_per_node=g, seq_tp=seq_tp_rule(layout.rules))
    out = Search(world, considered=len(cands), dropped=dropped)
    if not cands:
        raise sl.ShardingError(_no_layout(world, prof, dropped, g))
    scored = []
    smallest = None
    for base in cands:
        for mode in modes:  # the next mode only where the one before does not fit
            c = dataclasses.replace(base, recompute=mode)
            pred, peak = estimate(c, prof, dev, precision=precision, gpus_per_node=g)
            smallest = peak if smallest is None else min(smallest, peak)
            if peak <= dev.memory:
                scored.append((pred.step_s, c))
                break
        else:
            out.no_fit += 1
    scored.sort(key=lambda x: x[0])
    queue = list(reversed(scored))  # popped best first
    with _Tracer(_Job(layout, modes, dev, g), _workers(len(scored))) as tracer:
        while True:
            # the best estimates first; past ``top`` found, more while the time budget
            # lasts (the formulas only pre-sort: a traced layout outranks an untraced one)
            while queue and tracer.free() and not _done(out, top, t0, budget_s):
                tracer.submit(*queue.pop())
            if not tracer.busy() or _done(out, top, t0, budget_s):
                break  # what may still be tracing is past ``top`` and past the budget
            for est, result in tracer.collect(0.05):
                _take(out, result, est)
    if not out.found:
        raise sl.ShardingError(
            f"plan: no layout of {world} rank{'s' if world > 1 else ''} fits {dev.name}'s {human(dev.memory)} per GPU "
            f"({len(cands)} layouts considered); the smallest estimate needs "
            f"{human(smallest or 0)} per GPU. Use more GPUs (--world), a device with more "
            "memory, a smaller --global-batch or --seq, --precision bf16, or --recompute "
            "full")
    out.found.sort(key=lambda f: f.predicted.step_s)
    del out.found[top:]
    out.seconds = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class _Job:
    """What tracing one candidate needs (a forked worker inherits it)."""

    layout: Layout
    modes: list[str]
    dev: Device
    gpus_per_node: int

    def trace(self, c: Candidate) -> tuple[bool, list[Found | None]]:
        """Trace ``c`` in dry mode: (traced at all, then per recompute mode tried: the
        :class:`Found` where it fits, None where it does not). A trace under the next mode
        re-reads the same trace (a dry trace does not depend on the mode, only its memory
        report and prediction do)."""
        layout, modes = self.layout, self.modes
        try:
            lay = Layout(layout.model, c.mesh, sl.Rules.parse(c.rules, base=layout.rules),
                         dataclasses.replace(layout.options, **c.options()), layout.seed)
            ex = explain(lay)
        except sl.ShardingError:
            return False, []  # a shape the formulas did not catch (heads, experts, ...)
        tried: list[Found | None] = []
        for mode in modes[modes.index(c.recompute):]:
            c = dataclasses.replace(c, recompute=mode)
            ex = ex if ex.plan.options.recompute.value == mode else ex.with_recompute(mode)
            worst = max(ex.memory, key=lambda r: ex.memory[r].peak)
            if ex.memory[worst].peak <= self.dev.memory:
                tried.append(Found(c, ex.predict(self.dev, gpus_per_node=self.gpus_per_node),
                                   ex.memory[worst], worst, 0.0))
                break
            tried.append(None)
        return True, tried


_JOB: list[_Job] = []  # the running search's job, for the forked workers


def _trace_in_child(c: Candidate) -> tuple[bool, list[Found | None]]:
    return _JOB[0].trace(c)


def _child_starts() -> None:
    torch.set_num_threads(1)  # a forked child never enters the parent's OpenMP pool


def _workers(n: int) -> int:
    """Traces run side by side, one per core (a dry trace is single-threaded Python)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(n, cores or 1))


class _Tracer:
    """Runs :meth:`_Job.trace` in this process (one worker) or in forked workers, one
    candidate each at a time; leaving it ends the workers, traces in flight included."""

    def __init__(self, job: _Job, workers: int) -> None:
        self.job, self.workers = job, workers
        self.pool: multiprocessing.pool.Pool | None = None
        self.running: list[tuple[float, multiprocessing.pool.AsyncResult]] = []
        self.finished: list[tuple[float, tuple[bool, list[Found | None]]]] = []
        if workers > 1:
            _JOB[:] = [job]
            self.pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_child_starts)

    def free(self) -> bool:
        return len(self.running) < self.workers and not (self.pool is None and self.finished)

    def busy(self) -> bool:
        return bool(self.running or self.finished)

    def submit(self, est: float, c: Candidate) -> None:
        if self.pool is None:
            self.finished.append((est, self.job.trace(c)))
        else:
            self.running.append((est, self.pool.apply_async(_trace_in_child, (c,))))

    def collect(self, wait_s: float) -> list[tuple[float, tuple[bool, list[Found | None]]]]:
        """What has finished (waiting up to ``wait_s`` for the first of those running)."""
        if not self.finished and self.running:
            self.running[0][1].wait(wait_s)
        done = [r for r in self.running if r[1].ready()]
        self.running = [r for r in self.running if not r[1].ready()]
        out, self.finished = self.finished + [(est, r.get()) for est, r in done], []
        return out

    def __enter__(self) -> _Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _JOB.clear()


def _done(out: Search, top: int, t0: float, budget_s: float) -> bool:
    return len(out.found) >= top and time.perf_counter() - t0 > budget_s


def _take(out: Search, result: tuple[bool, list[Found | None]], est: float) -> None:
    traced, tried = result
    out.traced += traced
    for f in tried:
        if f is None:
            out.no_fit += 1
        else:
            out.found.append(dataclasses.replace(f, estimate_s=est))


def _recompute_modes(recompute: str) -> list[str]:
    if recompute == "auto":
        return ["none", "full"]
    if recompute not in {r.value for r in Recompute}:
        raise sl.ShardingError(
            f"--recompute {recompute!r}: choose auto (none, and full where a layout does not "
            "fit), none, selective or full")
    return [Recompute.parse(recompute).value]


def _no_layout(world: int, prof: ModelProfile, dropped: dict[str, int], g: int) -> str:
    why = "; ".join(f"{k} ({n})" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1])[:3])
    near = []
    for w in sorted(range(max(1, world // 2), 2 * world + 1), key=lambda w: (abs(w - world), w)):
        if w != world and candidates(w, prof, gpus_per_node=g)[0]:
            near.append(w)
        if len(near) == 3:
            break
    sizes = ", ".join(map(str, sorted(near))) or "none nearby"
    return (f"plan: no valid layout of {world} ranks for this model (global batch "
            f"{prof.batch}, seq {prof.seq}, {prof.layers} layers"
            f"{f', {prof.heads} heads' if prof.heads else ''}): {why}. World sizes near "
            f"{world} that work: {sizes}; or change --global-batch to a multiple of a "
            f"divisor of {world} (its divisors: {', '.join(map(str, divisors_of(world)[:8]))}"
            f"{', ...' if len(divisors_of(world)) > 8 else ''})")
