"""A hang, predicted: compare the per-rank schedules of a plan (dry mode traces every
rank separately, so a rank-dependent branch shows). Ranks of one group that would issue
different collectives (op, shape, dtype, phase, in issue order) would wait on each other
forever in a real run; :mod:`lowering.guard` stops such a run when it happens anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console

import shardlang as sl
from lowering.schedule import Op, Record

__all__ = ["Divergence", "divergences", "print_divergences"]


@dataclass(frozen=True)
class Divergence:
    """Two ranks of one group whose ``index``-th collective on ``axis`` differs (or one
    of which issues none): in a real run they would wait on each other forever."""

    axis: str
    group: tuple[int, ...]
    index: int
    ranks: tuple[int, int]
    records: tuple[Record | None, Record | None]

    def __str__(self) -> str:
        def what(r: int, rec: Record | None) -> str:
            if rec is None:
                return f"rank {r} issues no collective #{self.index} on {self.axis}"
            return (f"rank {r} issues {rec.op.value} over {rec.axis} of {list(rec.shape)} "
                    f"{rec.dtype} ({rec.phase.value}) at {rec.site}")
        (a, b), (ra, rb) = self.ranks, self.records
        return (f"ranks {a} and {b} (one {self.axis} group {list(self.group)}) diverge at their "
                f"collective #{self.index} on {self.axis}: {what(a, ra)}; {what(b, rb)}. A "
                "real run would hang here.")


def _key(rec: Record) -> tuple[object, ...]:
    return (rec.op, rec.shape, rec.dtype, rec.phase)


def divergences(ranks: Mapping[int, Sequence[Record]], mesh: sl.Mesh) -> list[Divergence]:
    """For every group of every axis among the given ranks, the first collective its
    ranks would not agree on (op, shape, dtype, phase, in issue order). Sends and
    receives (pp) pair across the group instead: each send must meet a receive."""
    found: list[Divergence] = []
    seen_groups: set[tuple[str, tuple[int, ...]]] = set()
    for rank in sorted(ranks):
        for axis in mesh.shape:
            group = mesh.group(rank, axis)
            members = [r for r in group if r in ranks]
            if (axis, group) in seen_groups or len(members) < 2:
                continue
            seen_groups.add((axis, group))
            per = {r: [x for x in ranks[r] if x.axis == axis
                       and x.op not in (Op.SEND, Op.RECV)] for r in members}
            first = members[0]
            for other in members[1:]:
                a, b = per[first], per[other]
                for i in range(max(len(a), len(b))):
                    ra = a[i] if i < len(a) else None
                    rb = b[i] if i < len(b) else None
                    if ra is None or rb is None or _key(ra) != _key(rb):
                        found.append(Divergence(axis, group, i, (first, other), (ra, rb)))
                        break
    return found


def print_divergences(found: Sequence[Divergence], console: Console, *, checked: int) -> None:
    if not found:
        console.print(f"collective check: the {checked} traced rank(s) agree on every "
                      "collective of every group they share (no hang predicted)")
        return
    console.print(f"[red]collective check: {len(found)} group(s) would hang[/]; the first:")
    console.print(str(found[0]), markup=False)
