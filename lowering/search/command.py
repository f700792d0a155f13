"""``shardlang plan MODEL --world N --device NAME [--gpus-per-node G] [--global-batch B]
[--seq S] [--precision P] [--top K] [--json]``: the flags and the printed ranking (the
search is :mod:`.search`)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

import shardlang as sl
from lowering.debug import seconds
from lowering.plan import DEVICES, Options, device, human
from lowering.run import Layout, resolve
from lowering.search.search import search

__all__ = ["add_plan_parser", "cmd_plan"]


def add_plan_parser(sub: argparse._SubParsersAction, model_help: str) -> None:  # noqa: SLF001
    p = sub.add_parser("plan", help="search the layouts of N GPUs (mesh, FSDP, microbatches, "
                                    "schedule) and print the fastest that fit, with memory, "
                                    "predicted time and why")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--config", default="", metavar="KEY=VALUE,...",
                   help="with hf:MODEL: override config fields")
    p.add_argument("--rules", default="", help="logical=mesh overrides on the default rules")
    p.add_argument("--world", type=int, required=True, metavar="N", help="number of GPUs")
    p.add_argument("--device", required=True, metavar="NAME",
                   help=f"device profile ({', '.join(DEVICES)})")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per node (default the device's); tp stays within a node")
    p.add_argument("--global-batch", type=int, default=None, metavar="B",
                   help="rows per optimizer step (default the model's)")
    p.add_argument("--seq", type=int, default=None, metavar="S", help="sequence length")
    p.add_argument("--precision", default="bf16", metavar="{fp32,bf16}",
                   help="compute precision (default bf16)")
    p.add_argument("--recompute", default="auto", metavar="{auto,none,selective,full}",
                   help="activation recompute of every layout: auto (the default) searches "
                        "without it and, where a layout does not fit, with full recompute; "
                        "none, selective (equal to none with fused attention) or full")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="how many layouts to trace and print (default 3)")
    p.add_argument("--budget", type=float, default=45.0, metavar="SECONDS",
                   help="keep tracing candidates past the top K until this many seconds "
                        "have passed since the search began (default 45; the formulas "
                        "only pre-sort them)")
    p.add_argument("--json", action="store_true",
                   help='print {"candidates": [{"mesh", "fsdp", "microbatches", "schedule", '
                        '"virtual", "recompute", "rules", "memory", "predicted", "why"}]} '
                        'best first ("rules": what to pass as --rules, e.g. norm_seq=sp+tp)')


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    if args.world < 1:
        raise sl.ShardingError(f"--world {args.world}: must be a positive number of GPUs")
    if args.top < 1:
        raise sl.ShardingError(f"--top {args.top}: must be at least 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise sl.ShardingError(f"--gpus-per-node {args.gpus_per_node}: must be at least 1")
    dev = device(args.device)
    options = Options.of(batch=args.global_batch, seq=args.seq, precision=args.precision)
    layout = Layout(resolve(args.model, config=args.config), sl.Mesh(),
                    sl.Rules.parse(args.rules, base=sl.Rules.default()), options)
    found = search(layout, args.world, dev, top=args.top, gpus_per_node=args.gpus_per_node,
                   budget_s=args.budget, recompute=args.recompute)
    if args.json:
        print(json.dumps({"world": args.world, "device": dev.name,
                          "considered": found.considered, "traced": found.traced,
                          "seconds": found.seconds,
                          "candidates": [f.json() for f in found.found]}))
        return 0
    t = Table(title=f"Best layouts of {args.world} x {dev.name} for {layout.model.name} "
                    f"({args.precision}), fastest first", title_justify="left")
    for col in ("#", "layout", "step", "tokens/s", "TFLOP/s/GPU", "MFU", "peak memory",
                "why"):
        t.add_column(col, justify="left" if col in ("layout", "why") else "right")
    for i, f in enumerate(found.found, 1):
        p = f.predicted
        t.add_row(str(i), f.candidate.label(), seconds(p.step_s), f"{p.tokens_per_s:,.0f}",
                  f"{p.tflops_per_gpu:.4g}", f"{p.mfu:.1%}",
                  f"{human(f.memory.peak)} (rank {f.memory_rank})", p.why)
    console.print(t)
    console.print(
        f"{found.considered} layouts considered ({sum(found.dropped.values())} others "
        f"ruled out by shapes, {found.no_fit} by memory), the best by a formula estimate "
        f"traced in dry mode ({found.traced}); each row is what `shardlang explain "
        f"--device {dev.name}` predicts for that layout. {found.seconds:.1f} s.")
    return 0
