"""Rich rendering of plans and schedules. Formatting only: every number comes from
records (:mod:`lowering.schedule`) or formulas (:mod:`lowering.analytic`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

import shardlang as sl
from lowering.parallel.sequence import causal_work
from lowering.plan import AxisVolume, Plan, describe, describe_pipe, human, unexplained
from lowering.run.train import Step
from lowering.schedule import RankSchedules, Record, totals

__all__ = ["print_explain", "print_plan", "print_pipeline", "print_schedule", "schedule_table",
           "group_ranks", "human", "stage_of", "StepPrinter"]


def group_ranks(s: RankSchedules) -> list[tuple[list[int], list[Record]]]:
    """Ranks whose schedules agree (op, axis, shape, dtype, phase, order), grouped."""
    groups: dict[tuple, tuple[list[int], list[Record]]] = {}
    for r, recs in s.ranks.items():
        key = tuple((x.signature(), x.site) for x in recs)
        groups.setdefault(key, ([], recs))[0].append(r)
    return list(groups.values())


def _ranks_label(ranks: Sequence[int]) -> str:
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def print_plan(plan: Plan, console: Console) -> None:
    t = Table(title=f"Parameters on {plan.mesh!r}", title_justify="left")
    cols = ["parameter", "shape", "logical axes", "spec", "placements", "role"]
    for col in cols + (["pp stage"] if plan.pipe else []):
        t.add_column(col, overflow="fold")
    for p in plan.params:
        axes = "(none: replicated)" if p.axes is None else str(p.axes)
        role = p.role.value + (f", fsdp dim {p.fsdp_dim}" if p.fsdp_dim is not None else "")
        row = [p.name, str(p.shape), axes, repr(p.spec), describe(p.placements, plan.mesh), role]
        t.add_row(*row, *([stage_of(plan, p.name)] if plan.pipe else []))
    for alias, target in plan.aliases:
        t.add_row(alias, "", "", "", f"= {target} (tied)", "", *([""] if plan.pipe else []))
    console.print(t)


def stage_of(plan: Plan, name: str) -> str:
    """The pipeline rank that holds a parameter ("every" outside the layer stack)."""
    pp = plan.pipeline.stage_of(name) if plan.pipeline else None
    return "every stage (grads summed over pp)" if pp is None else f"pp={pp}"


#: rows of one rank's schedule ``explain`` prints (the first ones and the last few); a
#: pipeline of many microbatches records hundreds of thousands, which ``--json`` lists
SHOWN_ROWS = 200


def schedule_table(title: str, recs: Sequence[Record], s: RankSchedules, rank: int, *,
                   limit: int | None = None) -> Table:
    """One rank's records as a table; with ``limit``, a longer schedule shows its first
    ``limit - 10`` and last 10 rows around one row saying how many are left out."""
    t = Table(title=title, title_justify="left")
    for col in ("#", "phase", "site", "op", "axis", "group", "shape", "dtype", "bytes", "wire"):
        t.add_column(col, justify="right" if col in ("#", "bytes", "wire") else "left",
                     overflow="fold")
    shown: list[Record | None] = list(recs)
    if limit is not None and len(recs) > limit:
        shown = [*recs[:limit - 10], None, *recs[-10:]]
    for x in shown:
        if x is None:
            left_out = len(recs) - len(shown) + 1
            t.add_row("...", "", f"{left_out:,} more collectives (every one: --json)", *[""] * 7)
            continue
        j = x.json(s.mesh, rank)
        t.add_row(str(x.index), x.phase.value, x.site, x.op.value, x.axis, str(j["group"]),
                  str(list(x.shape)), x.dtype, human(x.bytes), human(x.wire_bytes))
    return t


def _totals_table(recs: Sequence[Record], analytic: dict[str, AxisVolume]) -> Table:
    t = Table(title="Per-axis totals for one step on one rank: recorded vs analytic",
              title_justify="left")
    for col in ("axis", "collectives", "payload", "wire (recorded)", "wire (analytic)", "match",
                "formula"):
        t.add_column(col, overflow="fold")
    rec = totals(recs)["axis"]
    for axis in sorted(set(rec) | set(analytic)):
        got = rec.get(axis, {"count": 0, "bytes": 0, "wire_bytes": 0.0})
        want = analytic.get(axis)
        if want is None:
            t.add_row(axis, str(got["count"]), human(got["bytes"]), human(got["wire_bytes"]),
                      "-", "-", "no formula for this axis")
            continue
        diff = got["wire_bytes"] - want.wire_bytes
        match = "exact" if abs(diff) < 1e-6 else f"differs by {human(diff)}"
        t.add_row(axis, str(got["count"]), human(got["bytes"]), human(got["wire_bytes"]),
                  human(want.wire_bytes), match, want.formula)
    return t


def print_explain(s: RankSchedules, plan: Plan, analytic: dict[str, AxisVolume],
                  console: Console, *, traced: Sequence[int] = (), verbose_terms: bool = False
                  ) -> None:
    console.print(f"[bold]{s.model['name']}[/] ({s.model['params']:,} parameters) on "
                  f"[bold]{s.mesh!r}[/]: world size {s.mesh.size}")
    print_plan(plan, console)
    if plan.pipe is not None:
        print_pipeline(plan, console)
    if traced and len(traced) < len(s.ranks):
        console.print(f"traced rank(s) {list(traced)}; every rank runs the same SPMD program, "
                      "so the others issue the same collectives over their own groups")
    for ranks, recs in group_ranks(s):
        title = f"Schedule of {_ranks_label(ranks)}: {len(recs)} collectives in one training step"
        if len(ranks) > 1:
            title += " (group columns for the first rank)"
        console.print(schedule_table(title, recs, s, ranks[0], limit=SHOWN_ROWS))
    first = next(iter(s.ranks.values()), [])
    console.print(_totals_table(first, analytic))
    extra = unexplained(first, analytic)
    if extra:
        console.print(f"{len(extra)} recorded collective(s) that no formula term covers "
                      "(the difference above, if any):")
        console.print(schedule_table("Not in the formulas", extra, s, next(iter(s.ranks)),
                                     limit=SHOWN_ROWS))
    _print_sequence_work(plan, console)
    if verbose_terms:
        for vol in analytic.values():
            t = Table(title=f"Analytic terms for {vol.axis}", title_justify="left")
            for col in ("term", "op", "count", "payload", "wire"):
                t.add_column(col)
            for term in vol.terms:
                t.add_row(term.what, term.op.value, str(term.count), human(term.payload),
                          human(term.wire_bytes))
            console.print(t)


def print_pipeline(plan: Plan, console: Console, *, measured: Sequence[float] = ()) -> None:
    """The pipeline's stages, a text Gantt chart of its schedule and its bubble."""
    pl = plan.pipeline
    if pl is None:
        return
    pipe = pl.pipe
    d = describe_pipe(pipe, pl.n_layers, pl.stack)
    console.print(f"[bold]Pipeline[/]: {pipe.schedule.value}, pp={pipe.pp}, "
                  f"{pipe.microbatches} microbatches, {pipe.virtual} chunk(s) per rank; "
                  f"{pl.stack} ({pl.n_layers} layers) split as:")
    for r, chunks in d["layers"].items():  # type: ignore[union-attr]
        spans = ", ".join(f"layers {c[0]}-{c[-1]}" if len(c) > 1 else
                          f"layer {c[0]}" if c else "no layers" for c in chunks)
        extra = []
        if r == "0":
            extra.append("+ embedding")
        if str(pipe.rank_of(pipe.chunks - 1)) == r:
            extra.append("+ head and loss")
        console.print(f"  pp={r}: {spans} {' '.join(extra)}")
    unit = "one chunk's forward" if pipe.virtual > 1 else "one stage's forward"
    console.print(f"Gantt chart (a cell = {unit}; backward the same; F = forward, "
                  "b = backward, digit = microbatch, . = idle):", markup=False)
    for row in d["gantt"]:  # type: ignore[union-attr]
        console.print("  " + row, markup=False, highlight=False)
    b = d["bubble"]
    line = (f"bubble: theory (p-1)/(m+p-1){'/v' if pipe.virtual > 1 else ''} = "
            f"{b['theory']:.1%}; as scheduled above {b['scheduled']:.1%}")  # type: ignore[index]
    if measured:
        line += f"; measured (run mode, per step) {', '.join(f'{x:.1%}' for x in measured)}"
    console.print(line)


def _print_sequence_work(plan: Plan, console: Console) -> None:
    """Causal ring attention: the useful (query, key) pairs each sp rank computes."""
    n, seq = plan.mesh.sp, plan.options.seq
    if n == 1 or not plan.trace.attention or seq is None:
        return
    balanced = plan.options.load_balance
    work = causal_work(seq, n, balanced=balanced)
    layout = "load-balanced (rank r: chunks r and 2n-1-r)" if balanced else "contiguous"
    t = Table(title=f"Causal attention work per sp rank, {layout} sequence sharding",
              title_justify="left")
    t.add_column("sp rank")
    t.add_column("unmasked (q, k) pairs")
    t.add_column("vs the busiest")
    for r, w in enumerate(work):
        t.add_row(str(r), f"{w:,}", f"{w / max(work):.0%}")
    console.print(t)


def print_schedule(records: Sequence[Record], mesh: sl.Mesh, *, rank: int = 0,
                   console: Console | None = None, title: str = "") -> None:
    """Print one rank's records as the ``explain`` table does."""
    console = console or Console()
    s = RankSchedules(mesh, {"name": title}, {rank: list(records)})
    console.print(schedule_table(title or f"Schedule of rank {rank}", records, s, rank))


class StepPrinter:
    """Prints each step: loss, whether the ranks agree, wall time and tokens/s (rank 0's
    clock); and a summary (median step time after the first, which pays for warm-up)."""

    def __init__(self, steps: int, console: Console, label: str) -> None:
        self.steps, self.console, self.seen = steps, console, []
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), console=console,
                                 transient=True)
        self.task = self.progress.add_task(label, total=steps)

    def __call__(self, s: Step) -> None:
        self.seen.append(s)
        losses = s.losses
        agree = max(losses) - min(losses) < 1e-6
        ranks = f"({len(losses)} ranks agree)" if agree and len(losses) > 1 else (
            f"(ranks differ: min {min(losses):.6f} max {max(losses):.6f})" if len(losses) > 1 else "")
        rate = s.tokens / s.seconds if s.seconds > 0 else float("inf")
        self.progress.console.print(
            f"step {s.index + 1:4d}/{self.steps}  loss {losses[0]:.4f} {ranks}  "
            f"{s.seconds * 1e3:.0f} ms  {rate:,.0f} tok/s", highlight=False)
        for name, value in s.metrics.items():
            self.progress.console.print(f"           {name} {_fmt(value)}")
        self.progress.advance(self.task)

    def summary(self) -> None:
        if not self.seen:
            return
        timed = [s.seconds for s in self.seen[1:]] or [self.seen[0].seconds]
        med = statistics.median(timed)
        tokens = self.seen[0].tokens
        self.console.print(
            f"{len(self.seen)} steps: median {med * 1e3:.0f} ms/step"
            f"{' after the first' if len(self.seen) > 1 else ''}, {tokens / med:,.0f} tokens/s "
            f"({tokens} tokens per step; rank 0's wall clock)", highlight=False)


def _fmt(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
