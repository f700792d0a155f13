"""``shardlang bench MODEL --scale dp=1,2,4``: strong and weak scaling, measured.

One ``bench`` launch per point, each with ``--json``: **strong** scaling keeps the global
batch (the largest point's default, so every size divides it) and spreads it over more
ranks; **weak** scaling keeps the rows per rank, so the global batch grows with the axis.
Speed-up is tokens/s against the smallest point of the same kind; efficiency is the
speed-up over the growth in ranks. The communication share is the profiled step's time
in collectives over its length. The table prints with a bar per row (tokens/s), in the
terminal; ``--json`` prints the points.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

import shardlang as sl
from lowering.run.modes import Layout

__all__ = ["parse_scale", "run_scaling", "print_scaling", "launch_json"]


def parse_scale(text: str) -> tuple[str, list[int]]:
    """``"dp=1,2,4"`` -> ("dp", [1, 2, 4])."""
    axis, _, sizes = text.partition("=")
    axis = axis.strip()
    try:
        values = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        values = []
    if axis not in sl.MESH_AXES or len(values) < 2 or min(values) < 1 or \
            values != sorted(set(values)):
        raise sl.ShardingError(
            f"--scale {text!r}: give one mesh axis ({', '.join(sl.MESH_AXES)}) and at least two "
            "increasing sizes, e.g. --scale dp=1,2,4")
    return axis, values


def _argv(argv: Sequence[str], mesh: str | None, batch: int | None) -> list[str]:
    """``argv`` with --scale, --predict and --trace dropped, --mesh and --batch set (when
    given), and --json added."""
    out, skip = [], False
    dropped = ("--scale", "--trace", "--predict", *(("--mesh",) if mesh else ()),
               *(("--batch",) if batch else ()))
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in dropped:
            # --predict's device is optional: only a following name that is not a flag
            skip = ("=" not in a and i + 1 < len(argv)
                    and not (name == "--predict" and argv[i + 1].startswith("-")))
            continue
        if a != "--json":
            out.append(a)
    return [*out, *(["--mesh", mesh] if mesh else []),
            *(["--batch", str(batch)] if batch else []), "--json"]


def launch_json(argv: Sequence[str], *, mesh: str | None, batch: int | None, timeout: float,
                what: str) -> dict:
    """One ``bench --json`` launch of ``argv`` (its mesh and batch replaced when given):
    the layout's entry; a failed launch is a ShardingError naming ``what`` it was for."""
    p = subprocess.run([sys.executable, "-m", "lowering", *_argv(argv, mesh, batch)],
                       capture_output=True, text=True, timeout=timeout + 60)
    if p.returncode != 0:
        raise sl.ShardingError(
            f"{what}: the launch on {mesh or 'the mesh'} failed with exit code "
            f"{p.returncode}: {(p.stdout + p.stderr).strip()[-1500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["layouts"][0]


def _mesh_with(layout: Layout, axis: str, size: int) -> str:
    sizes = {a: layout.mesh.axis_size(a) for a in sl.MESH_AXES}
    sizes[axis] = size
    parts = [f"{a}={n}" for a, n in sizes.items() if n > 1]
    return ",".join(parts) or f"{axis}=1"


def run_scaling(layout: Layout, argv: Sequence[str], text: str, *, timeout: float,
                console: Console | None) -> list[dict]:
    """Launch every point; returns one entry per point (bench's JSON, plus ``kind``,
    ``size``, ``speedup``, ``efficiency``, ``comm_share``)."""
    axis, sizes = parse_scale(text)
    model = layout.model.build(seed=layout.seed, meta=True)
    batch0 = layout.shapes(model)[0]  # the preset's global batch (or --batch)
    strong = -(-batch0 // sizes[-1]) * sizes[-1]  # divisible by every size
    rows = -(-batch0 // sizes[0])  # weak: the smallest point's rows per rank
    points = [("strong", n, strong) for n in sizes] + [("weak", n, rows * n) for n in sizes]
    done: dict[tuple[int, int], dict] = {}
    out = []
    for kind, n, batch in points:
        mesh = _mesh_with(layout, axis, n)
        if (n, batch) not in done:
            if console is not None:
                console.print(f"{kind} scaling: {mesh}, global batch {batch}")
            done[(n, batch)] = launch_json(argv, mesh=mesh, batch=batch, timeout=timeout,
                                           what=f"--scale (global batch {batch})")
        out.append({**done[(n, batch)], "kind": kind, "size": n})
    for kind in ("strong", "weak"):
        mine = [e for e in out if e["kind"] == kind]
        first = mine[0]
        for e in mine:
            e["speedup"] = e["tokens_per_s"] / first["tokens_per_s"]
            e["efficiency"] = e["speedup"] / (e["size"] / first["size"])
            comm = sum(e["axis_s"].values())
            e["comm_share"] = comm / e["profiled_step_s"] if e["profiled_step_s"] else 0.0
    return out


def print_scaling(entries: list[dict], axis: str, console: Console) -> None:
    """One table per kind of scaling, with a tokens/s bar per row."""
    top = max(e["tokens_per_s"] for e in entries)
    for kind, what in (("strong", "global batch fixed"), ("weak", "rows per rank fixed")):
        rows = sorted((e for e in entries if e["kind"] == kind), key=lambda e: e["size"])
        t = Table(title=f"{kind} scaling over {axis} ({what}; median step, slowest rank)")
        for col in ("mesh", "batch", "step", "tokens/s", "speed-up", "efficiency",
                    "comm share", "peak memory / rank", ""):
            t.add_column(col)
        for e in rows:
            bar = "█" * max(1, round(30 * e["tokens_per_s"] / top))
            t.add_row(e["mesh"], str(e["batch"]), f"{e['step_s']['median'] * 1e3:.1f} ms",
                      f"{e['tokens_per_s']:,.0f}", f"{e['speedup']:.2f}x",
                      f"{e['efficiency']:.0%}", f"{e['comm_share']:.0%}",
                      f"{max(e['peak_memory'].values()) / 2**20:,.0f} MiB", bar)
        console.print(t)
