"""Show a sharding: the block of a tensor each rank holds, from its spec or placements
alone (as JAX's ``visualize_array_sharding``), as a rich grid or table; for a parameter
(from the plan) or a module's output (from a dry trace: no memory, any world size)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Shard

import shardlang as sl
from lowering.debug.inspect import Capture, check_layout
from lowering.debug.ranks import rank_prefix
from lowering.plan import describe, tensor_axes
from lowering.run import explain
from shardlang.errors import closest

__all__ = ["Block", "blocks", "show_sharding", "sharding_of"]


@dataclass(frozen=True)
class Block:
    """What one rank holds of a tensor: a [start, stop) range per dim; ``partial`` names
    the mesh axes over which the values are unreduced partial sums."""

    ranges: tuple[tuple[int, int], ...]
    partial: tuple[str, ...] = ()

    def __str__(self) -> str:
        dims = ", ".join(f"{a}:{b}" for a, b in self.ranges)
        return f"[{dims}]" + (f" partial over {'+'.join(self.partial)}" if self.partial else "")


def blocks(shape: Sequence[int], placements: Sequence[Placement], mesh: sl.Mesh
           ) -> dict[int, Block]:
    """Every rank's block of a tensor of global ``shape`` with these DTensor placements
    (one per mesh axis of size > 1 but pp, in canonical order), as torch.chunk splits it.

    Example:
        >>> import shardlang as sl
        >>> from torch.distributed.tensor import Shard, Replicate
        >>> str(blocks((8, 4), (Replicate(), Shard(0)), sl.Mesh(dp=2, tp=2))[1])
        '[4:8, 0:4]'
    """
    axes = tensor_axes(mesh)
    if len(placements) != len(axes):
        raise sl.ShardingError(
            f"{len(placements)} placements for the {len(axes)} mesh axes {axes} of {mesh!r}")
    out: dict[int, Block] = {}
    for rank in range(mesh.size):
        coord = mesh.coordinate(rank)
        ranges = [(0, s) for s in shape]
        partial = []
        for axis, p in zip(axes, placements):
            n, c = mesh.axis_size(axis), coord[axis]
            if isinstance(p, Shard):
                start, stop = ranges[p.dim]
                size = -(-(stop - start) // n)
                lo = min(start + c * size, stop)
                ranges[p.dim] = (lo, min(lo + size, stop))
            elif isinstance(p, Partial):
                partial.append(axis)
        out[rank] = Block(tuple(ranges), tuple(partial))
    return out


def _group_label(ranks: Sequence[int]) -> str:
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks)) if len(ranks) <= 8 else \
        ", ".join(map(str, ranks[:8])) + f", ... ({len(ranks)} ranks)"


def show_sharding(name: str, shape: Sequence[int], placements: Sequence[Placement],
                  mesh: sl.Mesh, console: Console, *, spec: sl.P | None = None,
                  stage: str = "", ranks: Sequence[int] | None = None) -> None:
    """Print which ranks hold which block of a tensor: a grid for 1-D and 2-D tensors
    (one cell per distinct block, listing its ranks), a table of blocks for any rank.
    ``ranks``: the ranks that hold it at all (a pipeline stage's), default every rank."""
    by_block: dict[Block, list[int]] = {}
    held = set(range(mesh.size) if ranks is None else ranks)
    for rank, b in blocks(shape, placements, mesh).items():
        if rank in held:
            by_block.setdefault(b, []).append(rank)
    head = f"[bold]{name}[/] {tuple(shape)}"
    if spec is not None:
        head += f": spec {spec!r}"
    head += f" -> placements {describe(tuple(placements), mesh)}"
    if stage:
        head += f"; {stage}"
    console.print(head)
    if len(shape) in (1, 2) and not any(b.partial for b in by_block):
        rows = sorted({b.ranges[0] for b in by_block})
        cols = sorted({b.ranges[1] for b in by_block}) if len(shape) == 2 else [(0, 1)]
        grid = Table(show_header=len(shape) == 2, show_lines=True,
                     title=f"{len(by_block)} distinct block(s) over {len(held)} rank(s)",
                     title_justify="left")
        grid.add_column("dim 0 \\ dim 1" if len(shape) == 2 else "dim 0")
        for c in cols:
            grid.add_column(f"{c[0]}:{c[1]}" if len(shape) == 2 else "ranks")
        for r in rows:
            cells = []
            for c in cols:
                key = (r, c) if len(shape) == 2 else (r,)
                ranks = [rk for b, rks in by_block.items() if b.ranges == key for rk in rks]
                cells.append("ranks " + _group_label(sorted(ranks)))
            grid.add_row(f"{r[0]}:{r[1]}", *cells)
        console.print(grid)
        return
    t = Table(title=f"{len(by_block)} distinct block(s) over {len(held)} rank(s)",
              title_justify="left")
    for col in ("ranks", "first rank's coordinate", "block (start:stop per dim)", "block shape"):
        t.add_column(col)
    for b, ranks in sorted(by_block.items(), key=lambda kv: kv[1][0]):
        shape_b = tuple(hi - lo for lo, hi in b.ranges)
        t.add_row(_group_label(sorted(ranks)), escape(rank_prefix(mesh, ranks[0])), str(b),
                  str(shape_b))
    console.print(t)


def sharding_of(layout: object, name: str) -> tuple[tuple[int, ...], tuple[Placement, ...],
                                                    sl.P | None, str, list[int]]:
    """(global shape, placements, spec, where, holding ranks) of a parameter (by name) or
    of a module's forward output (by module path, from a dry trace: no memory, any world
    size). Under a pipeline only the ranks of the stage that holds it hold a block."""
    check_layout(layout)
    ex = explain(layout, ranks=[0])
    try:
        p = ex.plan.param(name)
    except KeyError:
        pass
    else:
        pl = ex.plan.pipeline
        pp = pl.stage_of(name) if pl else None
        where = "" if pl is None else (f"held by pp={pp}" if pp is not None else
                                       "held by every stage (grads summed over pp)")
        return p.shape, p.placements, p.spec, where, _stage_ranks(layout.mesh, pp)
    cap = Capture(name, "forward", 0)

    def watch(models: Mapping[int, nn.Module], sess: object) -> None:
        cap.attach(models)

    explain(layout, ranks=[0], watch=watch)
    if not cap.found or not cap.got:
        names = [p.name for p in ex.plan.params]
        hint = closest(name, names)
        raise sl.ShardingError(
            f"--show {name!r}: neither a parameter nor a module (with a tensor output) of "
            f"{layout.model.name}" + (f"; did you mean {hint!r}?" if hint else ""))
    pp, t = next(iter(cap.got.items()))
    pl = tuple(t.placements) if isinstance(t, DTensor) else ()
    where = f"the output of module {name}" + (f" on pp={pp}" if layout.mesh.pp > 1 else "")
    if layout.mesh.pp > 1:
        where += " (one microbatch)"
    return (tuple(t.shape), pl, None, where,
            _stage_ranks(layout.mesh, pp if layout.mesh.pp > 1 else None))


def _stage_ranks(mesh: sl.Mesh, pp: int | None) -> list[int]:
    return [r for r in range(mesh.size) if pp is None or mesh.coordinate(r)["pp"] == pp]
