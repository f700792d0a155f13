"""Memory per rank, shown: the prediction of a dry trace (``explain``) beside what
simulate mode counts on real tensors (``simulate --memory``).

Both sides are :class:`lowering.plan.Memory` (bytes per category, for step 0): the dry
side from the plan and the traced step (:mod:`lowering.plan.memory`), the measured side
from the tensors every simulated rank holds (:mod:`lowering.run.memory`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from lowering.plan import CATEGORIES, Device, Memory, human
from lowering.run import Layout, explain, simulate

__all__ = ["predict_and_measure", "memory_table", "print_memory", "print_memory_check",
           "memory_mismatches", "MEMORY_RTOL", "fit"]

#: How close measured and predicted bytes come under a pipeline or bf16 (otherwise they
#: are equal to the byte): a pipeline's dry trace runs one microbatch per chunk and walks
#: it through the schedule, and a few KiB of small tensors (target blocks, position ids,
#: bf16 casts of norm weights) are held a little differently by the real microbatches and
#: casts. Measured on the tested layouts: at most 0.2% (pipelines), 0.6% (bf16).
MEMORY_RTOL = 1e-2


def _groups(memory: Mapping[int, Memory]) -> list[tuple[list[int], Memory]]:
    out: dict[Memory, list[int]] = {}
    for r in sorted(memory):
        out.setdefault(memory[r], []).append(r)
    return [(ranks, m) for m, ranks in out.items()]


def _label(ranks: Sequence[int]) -> str:
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def memory_table(memory: Mapping[int, Memory], title: str, *, stage_world: int = 0) -> Table:
    """One row per group of ranks that hold the same bytes (with ``stage_world``, a column
    for the pipeline stage)."""
    t = Table(title=title, title_justify="left")
    for col in ("ranks", *(["pp stage"] if stage_world else []), *CATEGORIES, "peak"):
        t.add_column(col, justify="left" if col == "ranks" else "right")
    for ranks, m in _groups(memory):
        stage = [str(ranks[0] // stage_world)] if stage_world else []
        t.add_row(_label(ranks), *stage, *(human(getattr(m, c)) for c in CATEGORIES),
                  human(m.peak))
    return t


def fit(memory: Mapping[int, Memory], dev: Device) -> dict[str, object]:
    """Whether every rank's peak fits ``dev``'s memory (``explain --device``'s JSON)."""
    worst = max(memory, key=lambda r: memory[r].peak)
    need = memory[worst].peak
    return {"name": dev.name, "memory": int(dev.memory), "fits": need <= dev.memory,
            "largest_peak": need, "largest_peak_rank": worst}


def print_memory(memory: Mapping[int, Memory], console: Console, *, pp: int = 1,
                 world: int = 1, dev: Device | None = None) -> None:
    """``explain``'s memory table: step 0's bytes per rank, predicted; with ``dev``,
    whether the largest fits its memory."""
    console.print(memory_table(
        memory, "Memory per rank, predicted for one training step (bytes held; peak = the "
        "sum, an upper bound)", stage_world=world // pp if pp > 1 else 0))
    if dev is None or not memory:
        return
    f = fit(memory, dev)
    share = f"{f['largest_peak'] / dev.memory:.0%} of {dev.name}'s {human(dev.memory)}"
    if f["fits"]:
        console.print(f"fits on {dev.name}: the largest peak, rank {f['largest_peak_rank']}'s "
                      f"{human(f['largest_peak'])}, is {share} (before the allocator's "
                      "fragmentation, workspaces and communication libraries' own buffers)")
    else:
        console.print(f"[red]does not fit[/] on {dev.name}: rank {f['largest_peak_rank']} "
                      f"needs {human(f['largest_peak'])}, {share}; shard more (--fsdp, tp, "
                      "pp with more microbatches) or shrink the batch")


def predict_and_measure(layout: Layout) -> tuple[dict[int, Memory], dict[int, Memory]]:
    """(predicted, measured) bytes per rank: a dry trace of every rank, then one simulated
    step of the whole mesh in this process."""
    predicted = explain(layout, ranks=list(range(layout.mesh.size))).memory
    result, _ = simulate(layout, steps=1, memory=True)
    return predicted, result.memory


def memory_mismatches(predicted: Mapping[int, Memory], measured: Mapping[int, Memory], *,
                      rtol: float = 0.0) -> list[str]:
    """One line per (rank, category) where the two differ by more than ``rtol``."""
    out = []
    for r in sorted(measured):
        p, m = predicted.get(r), measured[r]
        if p is None:
            out.append(f"rank {r}: no prediction")
            continue
        for c in CATEGORIES:
            a, b = getattr(p, c), getattr(m, c)
            if abs(a - b) > rtol * max(abs(a), abs(b)):
                out.append(f"rank {r} {c}: predicted {a:,} B, measured {b:,} B")
    return out


def print_memory_check(layout: Layout, console: Console) -> int:
    """``simulate --memory``: both tables and the comparison; the number of mismatches."""
    predicted, measured = predict_and_measure(layout)
    pp, world = layout.mesh.pp, layout.mesh.size
    stage = world // pp if pp > 1 else 0
    console.print(memory_table(predicted, "Memory per rank, predicted (dry trace)",
                               stage_world=stage))
    console.print(memory_table(measured, "Memory per rank, measured (tensors this process "
                               "holds for every simulated rank)", stage_world=stage))
    rtol = MEMORY_RTOL if pp > 1 or layout.options.precision.value != "fp32" else 0.0
    bad = memory_mismatches(predicted, measured, rtol=rtol)
    for line in bad:
        console.print(f"[red]mismatch[/] {line}")
    if not bad:
        how = "to the byte" if not rtol else f"within {rtol:.0%} (a pipeline or bf16)"
        console.print(f"predicted = measured for every rank and category, {how}")
    return len(bad)
