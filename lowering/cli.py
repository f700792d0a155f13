"""The ``shardlang`` command: explain (dry), simulate, run."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

import shardlang as sl
from lowering.debug import (describe_value, divergences, inspect, print_divergences,
                            print_inspection, print_ranks, sharding_of, show_sharding)
from lowering.launch import launch_torchrun
from lowering.modes import Layout, Parity, explain, run, simulate
from lowering.pipeline import Schedule, describe_pipe
from lowering.printer import print_explain
from lowering.registry import resolve
from lowering.runtime import under_torchrun
from lowering.schedule import schedule_json
from models import PRESETS
from models.datasets import Batches, ByteText

__all__ = ["main", "build_parser"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help=f"a preset ({', '.join(PRESETS)}) or package.module:factory")
    p.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. dp=2,tp=2")
    p.add_argument("--rules", default="",
                   help="logical=mesh overrides on the default rules, e.g. batch=dp,heads=tp "
                        "('+' joins mesh axes: batch=dp+ep; 'none' replicates)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters over dp (FSDP)")
    p.add_argument("--load-balance", action="store_true",
                   help="load-balanced causal sequence sharding: sp rank r holds chunks r and "
                        "2*sp-1-r (seq divisible by 2*sp)")
    p.add_argument("--batch", type=int, help="global batch size (default: the preset's, else 8; under pp, that "
                        "many rows per microbatch)")
    p.add_argument("--seq", type=int, help="sequence length (default: the preset's, else 32)")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--microbatches", type=int, default=None,
                   help="pipeline microbatches per step (pp > 1; default: pp)")
    p.add_argument("--schedule", default="1f1b", metavar="{" + ",".join(SCHEDULES) + "}",
                   help="pipeline schedule (pp > 1; default 1f1b)")
    p.add_argument("--virtual-stages", type=int, default=None, metavar="V",
                   help="model chunks per pipeline rank, interleaved schedule only "
                        "(default 2 there, else 1)")


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--data", metavar="FILE",
                   help="train a byte-level LM on this text file (default: the synthetic "
                        "arithmetic-sequence task)")
    p.add_argument("--check", action="store_true",
                   help="compare every rank's loss and gradients with the single-device "
                        "model; exit 1 on a mismatch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlang",
        description="Lower a named-axis sharded PyTorch model onto a 5D mesh "
                    "(dp, pp, tp, sp, ep): print its collective schedule, simulate every "
                    "rank in one process, or run it with torchrun.")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("explain", help="dry mode: print the plan and per-rank schedule "
                                       "(meta tensors, any world size, no memory)")
    _common(e)
    who = e.add_mutually_exclusive_group()
    who.add_argument("--rank", type=int, default=None,
                     help="the rank to show (default 0; with pp > 1, the first rank of "
                          "every pipeline stage)")
    who.add_argument("--all-ranks", action="store_true", help="every rank's schedule")
    e.add_argument("--json", action="store_true", help="one JSON object (DESIGN.md schema)")
    e.add_argument("--terms", action="store_true", help="list every analytic term")
    e.add_argument("--show", metavar="NAME", action="append", default=[],
                   help="show which rank holds which block of a parameter (e.g. "
                        "blocks.0.attn.q.weight) or of a module's output (e.g. blocks.0.attn); "
                        "repeatable")
    s = sub.add_parser("simulate", help="run every rank inside this process")
    _common(s)
    _training(s)
    s.add_argument("--inspect", metavar="SITE",
                   help="run one step and show every rank's local value of module SITE's "
                        "output (e.g. blocks.0.mlp)")
    s.add_argument("--phase", choices=("forward", "backward"), default="forward",
                   help="with --inspect: the output (forward) or the gradient arriving at "
                        "it (backward)")
    s.add_argument("--microbatch", type=int, default=None,
                   help="with --inspect under a pipeline: which microbatch (default 0)")
    s.add_argument("--rank", type=int, default=None, metavar="R",
                   help="with --inspect: only rank R")
    s.add_argument("--pdb", action="store_true",
                   help="with --inspect: stop in pdb the moment SITE is reached, mid-step, "
                        "with `ins` (ins.values[rank]: every rank's local tensor) in scope")
    r = sub.add_parser("run", help="train with torchrun, one process per rank "
                                   "(nccl on CUDA, else gloo)")
    _common(r)
    _training(r)
    r.add_argument("--check-collectives", choices=("first", "all", "off"), default="first",
                   help="check every collective's signature across its group before issuing "
                        "it, with a time limit (SHARDLANG_CHECK_TIMEOUT, default 60 s): on "
                        "the first step (default), on all steps, or off")
    r.add_argument("--launch-anyway", action="store_true",
                   help="launch even when the pre-launch check predicts a hang")
    r.add_argument("--inspect", metavar="SITE",
                   help="instead of training: one step in which every rank prints its local "
                        "value of module SITE's output, in rank order")
    r.add_argument("--timeout", type=float, default=600,
                   help="seconds before a launch is stopped (default 600)")
    r.add_argument("--schedule-json", metavar="FILE",
                   help="write every rank's recorded schedule (explain --json schema), "
                        "rank 0's loss per step and, with pp > 1, the measured pipeline "
                        "bubble per step to FILE")
    return parser


def _layout(args: argparse.Namespace) -> Layout:
    mesh = sl.Mesh.parse(args.mesh)
    rules = sl.Rules.parse(args.rules, base=sl.Rules.default())
    for flag in ("batch", "seq"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise sl.ShardingError(f"--{flag} {v}: must be a positive integer")
    Schedule.parse(args.schedule)  # an unknown name fails here, before any model is built
    if mesh.pp == 1 and args.microbatches not in (None, 1):
        raise sl.ShardingError(
            f"--microbatches {args.microbatches} needs a pipeline (pp > 1 in --mesh)")
    if mesh.pp == 1 and args.virtual_stages not in (None, 1):
        raise sl.ShardingError(
            f"--virtual-stages {args.virtual_stages} needs a pipeline (pp > 1 in --mesh)")
    return Layout(resolve(args.model), mesh, rules, fsdp=args.fsdp, batch=args.batch,
                  seq=args.seq, seed=args.seed, load_balance=args.load_balance,
                  schedule=args.schedule, microbatches=args.microbatches,
                  virtual=args.virtual_stages)


def _data(args: argparse.Namespace) -> Batches | None:
    return ByteText(args.data, seed=args.seed) if args.data else None


def _cmd_explain(args: argparse.Namespace, console: Console) -> int:
    layout = _layout(args)
    stage = layout.mesh.size // layout.mesh.pp
    ranks = (list(range(layout.mesh.size)) if args.all_ranks else
             [args.rank] if args.rank is not None else [s * stage for s in range(layout.mesh.pp)])
    for name in args.show:
        shape, pl, spec, where, holders = sharding_of(layout, name)
        show_sharding(name, shape, pl, layout.mesh, console, spec=spec, stage=where,
                      ranks=holders)
    if args.show and not args.all_ranks and args.rank is None:
        return 0
    ex = explain(layout, ranks=ranks)
    found = divergences(ex.schedules.ranks, layout.mesh) if len(ex.traced) > 1 else []
    if args.json:
        out = schedule_json(ex.schedules, analytic={a: v.json() for a, v in ex.analytic.items()})
        if ex.plan.pipe is not None:
            out["pipeline"] = describe_pipe(ex.plan.pipe, ex.plan.n_layers, ex.plan.stack)
        out["divergences"] = [str(d) for d in found]
        print(json.dumps(out))
        return 0
    print_explain(ex.schedules, ex.plan, ex.analytic, console, traced=ex.traced,
                  verbose_terms=args.terms)
    if len(ex.traced) > 1:
        print_divergences(found, console, checked=len(ex.traced))
    return 0


def _report(parity: Parity | None, console: Console) -> int:
    if parity is None:
        return 0
    for line in parity.lines:
        console.print(line)
    if parity.ok:
        console.print("[green]check passed[/]: every rank matches the single-device model "
                      "(loss and gradients within rtol=atol=1e-5; loss curve within 1e-4)")
        return 0
    console.print(f"[red]check FAILED[/]: {parity.worst_param} differs by "
                  f"{parity.worst_err:.3e} on rank {parity.worst_rank}")
    return 1


def _progress(steps: int, console: Console, label: str):  # noqa: ANN202
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), console=console,
                        transient=True)
    task = progress.add_task(label, total=steps)

    def on_step(step: int, losses: list[float], metrics: dict[str, object]) -> None:
        agree = max(losses) - min(losses) < 1e-6
        ranks = f"({len(losses)} ranks agree)" if agree and len(losses) > 1 else (
            f"(ranks differ: min {min(losses):.6f} max {max(losses):.6f})" if len(losses) > 1 else "")
        progress.console.print(f"step {step + 1:4d}/{steps}  loss {losses[0]:.4f} {ranks}")
        for name, value in metrics.items():
            progress.console.print(f"           {name} {_fmt(value)}")
        progress.advance(task)

    return progress, on_step


def _fmt(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    layout = _layout(args)
    console.print(f"simulating {layout.model.name} on {layout.mesh!r}: {layout.mesh.size} "
                  "ranks in this process")
    progress, on_step = _progress(args.steps, console, "simulate")
    if args.inspect:
        ins = inspect(layout, args.inspect, phase=args.phase, microbatch=args.microbatch,
                      stop=_debugger if args.pdb else None)
        if args.rank is not None and args.rank not in ins.values:
            raise sl.ShardingError(
                f"--rank {args.rank}: {args.inspect} runs on ranks {sorted(ins.values)} of "
                f"{layout.mesh!r}")
        print_inspection(ins, console, rank=args.rank)
        return 0
    with progress:
        _, parity = simulate(layout, steps=args.steps, check=args.check, data=_data(args),
                             lr=args.lr, on_step=on_step)
    return _report(parity, console)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str], console: Console) -> int:
    layout = _layout(args)
    if not under_torchrun():
        # validate the whole layout (a dry trace of every rank, up to 16) before launching
        ex = explain(layout, ranks=list(range(layout.mesh.size)))
        found = divergences(ex.schedules.ranks, layout.mesh) if len(ex.traced) > 1 else []
        if found:
            console.print("[red]pre-launch check: a hang is predicted[/]", highlight=False)
            console.print(str(found[0]), markup=False, highlight=False)
            if not args.launch_anyway:
                console.print("not launching (--launch-anyway launches regardless; the "
                              "collective check would then stop the run)")
                return 2
        console.print(f"launching torchrun: {layout.mesh.size} processes for {layout.mesh!r}")
        return launch_torchrun(layout.mesh.size, argv, timeout=args.timeout)
    if args.inspect:
        return _inspect_run(layout, args.inspect)
    progress, on_step = _progress(args.steps, console, "run")
    rank0 = _env_rank() == 0
    with progress if rank0 else contextlib.nullcontext():
        result, parity = run(layout, steps=args.steps, check=args.check, data=_data(args),
                             lr=args.lr, on_step=on_step if rank0 else None,
                             check_collectives=args.check_collectives)
    if result.bubble and rank0:
        console.print("pipeline bubble, measured from every stage's compute timestamps, per "
                      "step: " + ", ".join(f"{b:.1%}" for b in result.bubble))
    if args.schedule_json and rank0:
        from lowering.schedule import RankSchedules

        sched = RankSchedules(layout.mesh, {"name": layout.model.name}, result.rank_records)
        out = schedule_json(sched)
        out["losses"] = [step[0] for step in result.losses]  # rank 0's loss per step
        if result.bubble:
            out["bubble"] = {"measured": result.bubble}
        with open(args.schedule_json, "w") as f:
            json.dump(out, f)
    if parity is None or (not rank0 and parity.ok):
        return 0
    return _report(parity, console)  # rank 0 always reports; another rank when it fails


def _debugger(ins: object) -> None:
    """--pdb: a debugger at the inspected site, every rank's value in ``ins.values``."""
    import pdb

    print(f"stopped at {ins.site} ({ins.phase}); ins.values[rank] holds each rank's local "  # type: ignore[attr-defined]
          "tensor; 'c' continues the step")
    pdb.Pdb().set_trace()


def _inspect_run(layout: Layout, site: str) -> int:
    """Run mode: one step, every rank's local value of ``site``, printed in rank order."""
    import torch.distributed as dist

    from lowering.runtime import device_and_backend

    dist.init_process_group(device_and_backend()[1])  # one group: inspect reuses it
    try:
        ins = inspect(layout, site, run_mode=True)
        lines = "\n".join(f"{site} forward: {describe_value(v)}" for v in ins.values.values())
        print_ranks(lines, layout.mesh)
    finally:
        dist.destroy_process_group()
    return 0


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # DTensor's advice to flatten mesh dims for a 2-D loss all-reduce is noise here
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    # a pipe or a log file gets wide tables instead of rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        if args.command == "explain":
            return _cmd_explain(args, console)
        if args.command == "simulate":
            return _cmd_simulate(args, console)
        return _cmd_run(args, argv, console)
    except sl.ShardingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one paragraph, never a raw traceback
        if os.environ.get("SHARDLANG_DEBUG"):
            raise
        print(f"error: {args.command} {args.model} on --mesh {args.mesh} failed inside torch: "
              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
              "(set SHARDLANG_DEBUG=1 for the traceback; please report it if the layout "
              "passes 'shardlang explain')", file=sys.stderr)
        return 3
