"""Rank-local debugging: see which rank holds which block, every rank's value at a site,
ordered per-rank output, and schedule divergences (a hang) found before launch.

* :func:`blocks` / :func:`show_sharding`: the block of a tensor each rank holds, from
  its spec or placements alone (as JAX's ``visualize_array_sharding``), as a rich grid.
* :func:`inspect`: run one step in simulate mode (or, in a torchrun worker, run mode)
  and capture every rank's local value of a module's output (forward) or of the
  gradient arriving at it (backward), per microbatch under a pipeline.
* :func:`rank_prefix` / :func:`print_ranks`: ``[r5 pp=1 dp=0 tp=1]`` prefixes, and
  printing from every rank of a real run in rank order.
* :func:`divergences` (from :mod:`lowering.hangs`): compare the per-rank schedules of a
  plan; ranks of one group that would issue different collectives would hang a real run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Shard

import shardlang as sl
from lowering.hangs import Divergence, divergences, print_divergences  # re-exported
from lowering.placements import tensor_axes

__all__ = ["Block", "blocks", "show_sharding", "sharding_of", "rank_prefix", "print_ranks",
           "Inspection", "inspect", "print_inspection", "describe_value", "Divergence",
           "divergences", "print_divergences"]


# -- show a sharding -----------------------------------------------------------------------------
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


def rank_prefix(mesh: sl.Mesh, rank: int) -> str:
    """``[r5 pp=1 dp=0 tp=1]``: a rank and its coordinate on every axis of size > 1."""
    coord = mesh.coordinate(rank)
    return "[r" + " ".join([str(rank)] + [f"{a}={coord[a]}" for a in mesh.shape]) + "]"


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
    from lowering.placements import describe
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


# -- ordered output from a real run ----------------------------------------------------------------
def print_ranks(text: str, mesh: sl.Mesh) -> None:
    """Print ``text`` from every rank of a torchrun job, in rank order, each line with
    its rank prefix (a collective over the default group: call it on every rank; rank 0
    prints). Outside a process group, prints with rank 0's prefix.

    Example (in a torchrun worker)::

        print_ranks(f"loss {loss.item():.4f}", layout.mesh)
        # [r0 dp=0 tp=0] loss 5.5441
        # [r1 dp=0 tp=1] loss 5.5441 ...
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        everyone: list[str | None] = [text]
    else:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, text)
        if dist.get_rank() != 0:
            return
    for r, t in enumerate(everyone):
        for line in (t or "").splitlines() or [""]:
            print(f"{rank_prefix(mesh, r)} {line}", flush=True)


# -- inspect a site ------------------------------------------------------------------------------
@dataclass
class Inspection:
    """Every captured rank's local value at one site (``values[rank]``), with the
    global shape and placements it had there."""

    site: str
    phase: str
    microbatch: int | None
    mesh: sl.Mesh
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    placements: tuple[Placement, ...] = ()


def _local_values(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    from lowering._torch import rank_values
    local = t.to_local() if isinstance(t, DTensor) else t
    return [v.detach().clone() for v in rank_values(local.detach(), world)]


class _Capture:
    """Hooks one module (per pipeline stage model) and keeps the n-th call's value."""

    def __init__(self, site: str, phase: str, microbatch: int | None,
                 stop: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.site, self.phase, self.microbatch, self.stop = site, phase, microbatch, stop
        self.seen: dict[int, int] = {}
        self.got: dict[int, torch.Tensor] = {}  # pp coordinate -> captured tensor
        self.found = False
        self.outside = False  # a module outside the layer stack (runs on several stages)
        self.handles: list = []

    def attach(self, models: Mapping[int, nn.Module]) -> None:
        from lowering.stages import layer_stack
        stack = layer_stack(next(iter(models.values())))
        self.outside = len(models) > 1 and stack is not None and not (
            self.site == stack[0] or self.site.startswith(f"{stack[0]}."))
        for pp, model in models.items():
            try:
                mod = model.get_submodule(self.site)
            except AttributeError:
                continue
            self.found = True
            self.handles.append(mod.register_forward_hook(self._hook(pp)))

    def _hook(self, pp: int):  # noqa: ANN202
        def keep(value: torch.Tensor) -> None:
            n = self.seen.get(pp, 0)
            self.seen[pp] = n + 1
            if pp not in self.got and (self.microbatch is None or n == self.microbatch):
                if self.outside and self.got:
                    return  # before the stack: only the first stage's value is real
                self.got[pp] = value
                if self.stop is not None:
                    self.stop(pp, value)

        def forward(mod: nn.Module, args: tuple, out: object) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, torch.Tensor):
                return
            if self.phase == "forward":
                keep(t)
            elif t.requires_grad:
                t.register_hook(lambda g: keep(g) or None)
        return forward


def inspect(layout: object, site: str, *, phase: str = "forward", microbatch: int | None = None,
            run_mode: bool = False, stop: Callable[[Inspection], None] | None = None
            ) -> Inspection:
    """One training step in simulate mode (every rank in this process) or, with
    ``run_mode`` inside a torchrun worker, this rank's; returns each rank's local value
    of ``site``'s output (forward) or of the gradient arriving at that output (backward).

    ``site`` is a module path (``blocks.0.attn``); under a pipeline, ``microbatch`` picks
    the microbatch (default: the first). ``stop`` is called the moment the site is
    reached, mid-step, with every rank's value so far: call ``breakpoint()`` in it to
    debug there with every rank visible (``shardlang simulate --inspect SITE --pdb``).
    Example::

        ins = lowering.inspect(Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2)), "blocks.0.mlp")
        ins.values[3]          # rank 3's local block, a plain tensor
    """
    from lowering.modes import Layout, _train_mode
    from lowering.runtime import Mode

    _check_layout(layout, Layout)
    if phase not in ("forward", "backward"):
        raise sl.ShardingError(f"phase {phase!r}: inspect 'forward' (the site's output) or "
                               "'backward' (the gradient arriving at it)")
    ins = Inspection(site, phase, None, layout.mesh)
    sess_of: dict[str, object] = {}

    def reached(pp: int, value: torch.Tensor) -> None:
        _fill(ins, {pp: value}, sess_of["sess"], layout.mesh)
        if stop is not None:
            stop(ins)

    cap = _Capture(site, phase, microbatch if layout.mesh.pp > 1 else None, reached)
    if layout.mesh.pp > 1 and cap.microbatch is None:
        cap.microbatch = 0
    ins.microbatch = cap.microbatch
    mode = Mode.RUN if run_mode else Mode.SIMULATE

    def watch(models: Mapping[int, nn.Module], sess: object) -> None:
        cap.attach(models)
        if not cap.found:
            names = [n for m in models.values() for n, _ in m.named_modules() if n]
            from shardlang.errors import closest
            hint = closest(site, names)
            raise sl.ShardingError(
                f"no module {site!r} in {layout.model.name}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + " (inspect takes a module path, e.g. blocks.0.attn)")
        sess_of["sess"] = sess

    _train_mode(layout, mode, steps=1, check=False, data=None, lr=0.0, on_step=None,
                watch=watch)
    return ins


def _check_layout(layout: object, cls: type) -> None:
    if not isinstance(layout, cls):
        raise sl.ShardingError(
            f"expected a lowering.modes.Layout (model, mesh, rules, options), got "
            f"{type(layout).__name__}")


def _fill(ins: Inspection, got: Mapping[int, torch.Tensor], sess: object, mesh: sl.Mesh) -> None:
    """Add the captured values (pp coordinate -> tensor) to ``ins`` by global rank."""
    from lowering.runtime import Mode
    stage = mesh.size // mesh.pp
    for pp, t in got.items():
        ins.shape = tuple(t.shape)
        ins.placements = tuple(t.placements) if isinstance(t, DTensor) else ()
        if sess.mode is Mode.SIMULATE:  # type: ignore[attr-defined]
            for i, v in enumerate(_local_values(t, stage)):
                ins.values[pp * stage + i] = v
        else:
            ins.values[sess.rank] = _local_values(t, 1)[0]  # type: ignore[attr-defined]


def _stats(v: torch.Tensor) -> list[str]:
    f = v.detach().float()
    if f.numel() == 0:
        return ["-"] * 4
    return [f"{f.min().item():.6g}", f"{f.max().item():.6g}", f"{f.mean().item():.6g}",
            f"{f.norm().item():.6g}"]


def describe_value(v: torch.Tensor, *, small: int = 16) -> str:
    """One line: shape, dtype, min/max/mean/norm, and the values themselves when small."""
    mn, mx, mean, norm = _stats(v)
    line = (f"local {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')} min {mn} max {mx} "
            f"mean {mean} norm {norm}")
    if v.numel() <= small:
        line += " values " + str([round(x, 6) for x in v.detach().float().flatten().tolist()])
    return line


def print_inspection(ins: Inspection, console: Console, *, rank: int | None = None) -> None:
    """Every captured rank side by side (or one rank)."""
    where = f"{ins.site} ({ins.phase}" + (f", microbatch {ins.microbatch})"
                                          if ins.microbatch is not None else ")")
    console.print(f"[bold]{where}[/]: global shape {ins.shape}"
                  + (f", placements {tuple(map(str, ins.placements))}" if ins.placements else ""))
    t = Table(title_justify="left")
    for col in ("rank", "local shape", "dtype", "min", "max", "mean", "norm", "values"):
        t.add_column(col, overflow="fold")
    for r, v in sorted(ins.values.items()):
        if rank is not None and r != rank:
            continue
        vals = (str([round(x, 4) for x in v.float().flatten().tolist()]) if v.numel() <= 16
                else f"({v.numel()} values)")
        t.add_row(escape(rank_prefix(ins.mesh, r)), str(tuple(v.shape)),
                  str(v.dtype).removeprefix("torch."), *_stats(v), vals)
    console.print(t)


def sharding_of(layout: object, name: str) -> tuple[tuple[int, ...], tuple[Placement, ...],
                                                    sl.P | None, str, list[int]]:
    """(global shape, placements, spec, where, holding ranks) of a parameter (by name) or
    of a module's forward output (by module path, from a dry trace: no memory, any world
    size). Under a pipeline only the ranks of the stage that holds it hold a block."""
    from lowering.modes import Layout, explain

    _check_layout(layout, Layout)
    ex = explain(layout, ranks=[0])
    try:
        p = ex.plan.param(name)
    except KeyError:
        pass
    else:
        from lowering.printer import stage_of
        where = f"held by {stage_of(ex.plan, name)}" if ex.plan.pipe else ""
        stage = stage_of(ex.plan, name) if ex.plan.pipe else ""
        pp = int(stage[3:]) if stage.startswith("pp=") else None
        return p.shape, p.placements, p.spec, where, _stage_ranks(layout.mesh, pp)
    cap = _Capture(name, "forward", 0)

    def watch(models: Mapping[int, nn.Module], sess: object) -> None:
        cap.attach(models)

    explain(layout, ranks=[0], watch=watch)
    if not cap.found or not cap.got:
        from shardlang.errors import closest
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
