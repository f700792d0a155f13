"""``shardlang bench MODEL --mesh M [--steps N] [--warmup W] [--baseline] [--trace FILE]
[--scale AXIS=SIZES] [--predict [DEVICE]] [--json]``: the flags and the printed table (the
launch and the measuring are in :mod:`.runner`, scaling in :mod:`.scale`, prediction
beside measurement in :mod:`.validate`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

import shardlang as sl
from lowering.bench.runner import bench_layout, write_trace
from lowering.bench.scale import parse_scale, print_scaling, run_scaling
from lowering.bench.validate import print_predicted, run_predicted
from lowering.run.launch import launch_torchrun
from lowering.run.modes import Layout
from lowering.run.session import under_torchrun

__all__ = ["add_bench_parser", "cmd_bench"]


def add_bench_parser(sub: argparse._SubParsersAction, common: Callable) -> None:  # noqa: SLF001
    b = sub.add_parser("bench", help="measure step time, tokens/s, TFLOP/s, peak memory and "
                                     "time per mesh axis under torchrun, optionally beside "
                                     "the hand-written torch.distributed baseline")
    common(b)
    b.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="steps before measuring (default 3)")
    b.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    b.add_argument("--baseline", action="store_true",
                   help="also run the model hand-parallelized with plain torch.distributed "
                        "(DDP, fully_shard, parallelize_module TP, their combination) in the "
                        "same launch, one step each in turn, and print the ratio")
    b.add_argument("--trace", metavar="FILE",
                   help="write a Chrome/Perfetto trace (ui.perfetto.dev) of the profiled step, "
                        "one process per rank")
    b.add_argument("--json", action="store_true",
                   help='print {"layouts": [{"mesh", "step_s", "tokens_per_s", "tflops", '
                        '"peak_memory", "axis_s", "baseline", ...}]}')
    b.add_argument("--scale", metavar="AXIS=SIZES",
                   help="strong and weak scaling over one mesh axis, e.g. dp=1,2,4: one launch "
                        "per point (the rest of --mesh kept), a table with speed-up, "
                        "efficiency and communication share, and a bar per row")
    b.add_argument("--predict", nargs="?", const="cpu", metavar="DEVICE",
                   help="also predict the step as explain --device DEVICE does (default cpu: "
                        "this machine's profile) and print predicted vs measured and the error")
    b.add_argument("--timeout", type=float, default=900,
                   help="seconds before the launch is stopped (default 900)")


def cmd_bench(args: argparse.Namespace, argv: Sequence[str], layout: Layout,
              console: Console) -> int:
    for flag, v, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if v < low:
            raise sl.ShardingError(f"{flag} {v}: must be at least {low}")
    if args.scale and not under_torchrun():
        axis, _ = parse_scale(args.scale)
        points = run_scaling(layout, argv, args.scale, timeout=args.timeout,
                             console=None if args.json else console)
        if args.json:
            print(json.dumps({"scaling": points}))
        else:
            print_scaling(points, axis, console)
        return 0
    if args.predict and not under_torchrun():
        if args.scale:
            raise sl.ShardingError("--predict with --scale: predict one layout at a time "
                                   "(drop --scale)")
        entry = run_predicted(layout, argv, args.predict, timeout=args.timeout)
        if args.json:
            print(json.dumps({"layouts": [entry]}))
        else:
            print_predicted([entry], console)
        return 0
    if not under_torchrun():
        if not args.json:
            console.print(f"launching torchrun: {layout.mesh.size} processes for "
                          f"{layout.mesh!r} ({args.warmup} warm-up + {args.steps} measured "
                          "steps + 1 profiled)")
        return launch_torchrun(layout.mesh.size, argv, timeout=args.timeout)
    entry = bench_layout(layout, steps=args.steps, warmup=args.warmup, baseline=args.baseline,
                         trace=bool(args.trace), lr=args.lr)
    if entry is None:
        return 0
    if args.trace:
        write_trace(entry, args.trace)
    entry.pop("_traces", None)
    if args.json:
        print(json.dumps({"layouts": [entry]}))
    else:
        print_bench([entry], console)
        if args.trace:
            console.print(f"trace of the profiled step: {args.trace} (open in ui.perfetto.dev)")
    return 0


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def print_bench(entries: list[dict], console: Console) -> None:
    """The measured table, then each layout's breakdown of its profiled step."""
    t = Table(title="measured (median of the slowest rank per step; min..max)")
    for col in ("mesh", "step", "tokens/s", "TFLOP/s", "peak memory / rank", "baseline",
                "baseline step", "ratio"):
        t.add_column(col)
    for e in entries:
        s, b = e["step_s"], e.get("baseline")
        mem = max(e["peak_memory"].values())
        t.add_row(e["mesh"] + (" fsdp" if e["fsdp"] else ""),
                  f"{_ms(s['median'])} ({_ms(s['min'])}..{_ms(s['max'])})",
                  f"{e['tokens_per_s']:,.0f}", f"{e['tflops']:.4f}",
                  f"{mem / 2**20:,.0f} MiB", b["name"] if b else (e.get("baseline_note") or "-"),
                  _ms(b["step_s"]["median"]) if b else "-",
                  f"{b['ratio']:.3f}" if b else "-")
    console.print(t)
    for e in entries:
        parts = [f"{a} {_ms(v)}" for a, v in e["axis_s"].items()]
        total = e["profiled_step_s"]
        console.print(
            f"{e['mesh']}: profiled step {_ms(total)} = compute {_ms(e['compute_s'])} + "
            f"collectives ({', '.join(parts) or 'none'}) + other {_ms(e['other_s'])} "
            f"(Python and framework); peak memory is {e['peak_memory_kind']}"
            + (f"; pipeline bubble {e['bubble']:.1%}" if e.get("bubble") is not None else ""),
            highlight=False)
