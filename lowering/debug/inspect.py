"""Inspect a site: run one step in simulate mode (or, in a torchrun worker, run mode)
and capture every rank's local value of a module's output (forward) or of the gradient
arriving at it (backward), per microbatch under a pipeline; print them side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.distributed.tensor import DTensor, Placement

import shardlang as sl
from lowering._torch import rank_values
from lowering.debug.ranks import rank_prefix
from lowering.plan import layer_stack
from lowering.run import Layout, Mode, train_layout
from lowering.schedule import Phase
from shardlang.errors import closest

__all__ = ["Inspection", "Capture", "inspect", "print_inspection", "describe_value",
           "check_layout"]


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
    local = t.to_local() if isinstance(t, DTensor) else t
    return [v.detach().clone() for v in rank_values(local.detach(), world)]


class Capture:
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

        ins = lowering.debug.inspect(Layout.of("gpt-tiny", "dp=2,tp=2"), "blocks.0.mlp")
        ins.values[3]          # rank 3's local block, a plain tensor
    """
    check_layout(layout)
    phase = Phase.parse(phase).value
    if phase == Phase.OPTIMIZER.value:
        raise sl.ShardingError("phase='optimizer' (--phase optimizer): inspect 'forward' (the "
                               "site's output) or 'backward' (the gradient arriving at it)")
    ins = Inspection(site, phase, None, layout.mesh)
    sess_of: dict[str, object] = {}

    def reached(pp: int, value: torch.Tensor) -> None:
        _fill(ins, {pp: value}, sess_of["sess"], layout.mesh)
        if stop is not None:
            stop(ins)

    cap = Capture(site, phase, microbatch if layout.mesh.pp > 1 else None, reached)
    if layout.mesh.pp > 1 and cap.microbatch is None:
        cap.microbatch = 0
    ins.microbatch = cap.microbatch
    mode = Mode.RUN if run_mode else Mode.SIMULATE

    def watch(models: Mapping[int, nn.Module], sess: object) -> None:
        cap.attach(models)
        if not cap.found:
            names = [n for m in models.values() for n, _ in m.named_modules() if n]
            hint = closest(site, names)
            raise sl.ShardingError(
                f"no module {site!r} in {layout.model.name}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + " (inspect takes a module path, e.g. blocks.0.attn)")
        sess_of["sess"] = sess

    train_layout(layout, mode, steps=1, lr=0.0, watch=watch)
    return ins


def check_layout(layout: object) -> None:
    """A debugging call takes a :class:`lowering.run.Layout`."""
    if not isinstance(layout, Layout):
        raise sl.ShardingError(
            f"expected a lowering.run.Layout (model, mesh, rules, options), got "
            f"{type(layout).__name__}")


def _fill(ins: Inspection, got: Mapping[int, torch.Tensor], sess: object, mesh: sl.Mesh) -> None:
    """Add the captured values (pp coordinate -> tensor) to ``ins`` by global rank."""
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
