"""The ``shardlang`` command: explain (dry), simulate, run, bench, plan.

Exit codes: 0 ok; 1 a ``--check`` mismatch; 2 bad input (a ShardingError, one paragraph,
no traceback); 3 an unexpected failure inside torch (one paragraph; SHARDLANG_DEBUG=1
shows the traceback); 4 ``explain`` predicts a hang (ranks of a group would issue
different collectives); 124 a ``run`` launch stopped by its ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from rich.console import Console

import shardlang as sl
from lowering._torch import quiet_dtensor_warnings
from lowering.bench.calibrate import add_calibrate_parser, cmd_calibrate
from lowering.bench.command import add_bench_parser, cmd_bench
from lowering.search import add_plan_parser, cmd_plan
from lowering.debug import (describe_value, divergences, fit, inspect, print_divergences,
                            print_inspection, print_memory, print_memory_check,
                            print_predicted, print_ranks, sharding_of, show_sharding)
from lowering.plan import DEVICES, Options, Schedule, describe_pipe, device, option_fields
from lowering.printer import StepPrinter, print_explain
from lowering.run import CheckMode, Layout, Parity, explain, resolve, run, simulate
from lowering.run.launch import launch_torchrun, report_worker_error
from lowering.run.scripts import is_script, script_command
from lowering.run.session import device_and_backend, process_group_closed, under_torchrun
from lowering.run.train import Checkpointing
from lowering.schedule import RankSchedules, schedule_json
from models import PRESETS
from models.datasets import Batches, ByteText

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_CHECK", "EXIT_BAD_INPUT", "EXIT_TORCH",
           "EXIT_HANG"]

EXIT_OK, EXIT_CHECK, EXIT_BAD_INPUT, EXIT_TORCH, EXIT_HANG = 0, 1, 2, 3, 4


_MODEL_HELP = (f"a preset ({', '.join(PRESETS)}), package.module:factory, or a Hugging Face "
               "model: hf:NAME (a built-in architecture, e.g. hf:llama-3-8b; needs the .[hf] "
               "extra) or hf:PATH (a folder with config.json and safetensors weights)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--config", default="", metavar="KEY=VALUE,...",
                   help="with hf:MODEL: override config fields, e.g. "
                        "num_hidden_layers=2,hidden_size=64 (runs any architecture tiny)")
    p.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. dp=2,tp=2")
    p.add_argument("--rules", default="",
                   help="logical=mesh overrides on the default rules, e.g. batch=dp,heads=tp "
                        "('+' joins mesh axes: batch=dp+ep; 'none' replicates)")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    for f in option_fields():  # the layout options, declared once in lowering.plan.Options
        flag, help_ = f.metadata["flag"], f.metadata["help"]
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=help_)
        elif f.name in ("schedule", "precision", "recompute"):
            p.add_argument(flag, dest=f.name, default=None, metavar=f.metadata["metavar"],
                           help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=int, default=None,
                           metavar=f.metadata["metavar"], help=help_)


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--data", metavar="FILE",
                   help="train a byte-level LM on this text file (default: the synthetic "
                        "arithmetic-sequence task)")
    p.add_argument("--check", action="store_true",
                   help="compare every rank's loss and gradients with the single-device "
                        "model; exit 1 on a mismatch")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="folder of checkpoints (torch DCP): --save-every N writes "
                        "DIR/step-NNNNN, --resume continues from the newest complete one")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="with --checkpoint: save after every N steps")
    p.add_argument("--resume", action="store_true",
                   help="with --checkpoint: continue from its newest complete checkpoint "
                        "(on this mesh, whatever mesh saved it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlang",
        description="Lower a named-axis sharded PyTorch model onto a 5D mesh "
                    "(dp, pp, tp, sp, ep): print its collective schedule, simulate every "
                    "rank in one process, or run it with torchrun.",
        epilog="exit codes: 0 ok, 1 --check mismatch, 2 bad input, 3 failure inside torch, "
               "4 explain predicts a hang, 124 run stopped by --timeout")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("explain", help="dry mode: print the plan and per-rank schedule "
                                       "(meta tensors, any world size, no memory)")
    _common(e)
    who = e.add_mutually_exclusive_group()
    who.add_argument("--rank", type=int, default=None,
                     help="the rank to show (default 0; with pp > 1, the first rank of "
                          "every pipeline stage)")
    who.add_argument("--all-ranks", action="store_true",
                     help="every rank's schedule; exit 4 if ranks would hang")
    e.add_argument("--json", action="store_true",
                   help="one JSON object: mesh, world_size, model, ranks (each rank's "
                        "collectives), totals, analytic, memory (each rank's bytes)")
    e.add_argument("--terms", action="store_true", help="list every analytic term")
    e.add_argument("--device", metavar="NAME", default=None,
                   help="predict the step on this device (time, tokens/s, MFU, seconds per "
                        "mesh axis, bubble) and say whether each rank's memory fits "
                        f"({', '.join(DEVICES)}; figures and sources in "
                        "lowering/plan/devices.py)")
    e.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="with --device: GPUs per node (default the device's); groups within "
                        "a node talk over NVLink, others over the network")
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
    s.add_argument("--phase", default="forward", metavar="{forward,backward}",
                   help="with --inspect: the output (forward) or the gradient arriving at "
                        "it (backward)")
    s.add_argument("--microbatch", type=int, default=None,
                   help="with --inspect under a pipeline: which microbatch (default 0)")
    s.add_argument("--rank", type=int, default=None, metavar="R",
                   help="with --inspect: only rank R")
    s.add_argument("--memory", action="store_true",
                   help="instead of training: one step that counts the bytes every rank "
                        "holds (parameters, gradients, optimizer state, activations saved "
                        "for backward, buffers) beside explain's prediction; exit 1 if they "
                        "differ (under a pipeline or bf16, by more than 1%%)")
    s.add_argument("--pdb", action="store_true",
                   help="with --inspect: stop in pdb the moment SITE is reached, mid-step, "
                        "with `ins` (ins.values[rank]: every rank's local tensor) in scope")
    r = sub.add_parser("run", help="train with torchrun, one process per rank "
                                   "(nccl on CUDA, else gloo)")
    _common(r)
    _training(r)
    r.add_argument("--check-collectives", default="first", metavar="{first,all,off}",
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
    add_bench_parser(sub, _common)
    add_plan_parser(sub, _MODEL_HELP)
    add_calibrate_parser(sub)
    return parser


def _layout(args: argparse.Namespace) -> Layout:
    """The layout the flags describe (validated by lowering.lower when it is planned)."""
    mesh = sl.Mesh.parse(args.mesh)
    rules = sl.Rules.parse(args.rules, base=sl.Rules.default())
    values = {f.name: getattr(args, f.name) for f in option_fields()}
    if values["schedule"] is not None:
        values["schedule"] = Schedule.parse(values["schedule"])
    if values["precision"] is None:
        del values["precision"]
    return Layout(resolve(args.model, config=args.config), mesh, rules, Options(**values),
                  args.seed)


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
        return EXIT_OK
    dev = device(args.device) if args.device else None
    ex = explain(layout, ranks=ranks)
    found = divergences(ex.schedules.ranks, layout.mesh) if len(ex.traced) > 1 else []
    if args.json:
        out = schedule_json(ex.schedules, analytic={a: v.json() for a, v in ex.analytic.items()})
        if ex.plan.pipeline is not None:
            pl = ex.plan.pipeline
            out["pipeline"] = describe_pipe(pl.pipe, pl.n_layers, pl.stack)
        out["divergences"] = [str(d) for d in found]
        out["memory"] = {str(r): m.json() for r, m in sorted(ex.memory.items())}
        if dev is not None:
            out["device"] = fit(ex.memory, dev)
            out["predicted"] = ex.predict(dev, gpus_per_node=args.gpus_per_node).json()
        print(json.dumps(out))
    else:
        print_explain(ex.schedules, ex.plan, ex.analytic, console, traced=ex.traced,
                      verbose_terms=args.terms)
        print_memory(ex.memory, console, pp=layout.mesh.pp, world=layout.mesh.size, dev=dev)
        if dev is not None:
            print_predicted(ex.predict(dev, gpus_per_node=args.gpus_per_node), dev,
                            layout.mesh, console, precision=ex.precision,
                            gpus_per_node=args.gpus_per_node)
        if len(ex.traced) > 1:
            print_divergences(found, console, checked=len(ex.traced))
    return EXIT_HANG if found else EXIT_OK


def _report(parity: Parity | None, console: Console) -> int:
    if parity is None:
        return EXIT_OK
    for line in parity.lines:
        console.print(line)
    if parity.ok:
        console.print("[green]check passed[/]: every rank matches the single-device model "
                      f"({parity.tolerance})")
        return EXIT_OK
    console.print(f"[red]check FAILED[/]: {parity.worst_param} differs by "
                  f"{parity.worst_err:.3e} on rank {parity.worst_rank}")
    return EXIT_CHECK


def _checkpointing(args: argparse.Namespace) -> Checkpointing | None:
    if args.checkpoint is None:
        if args.save_every or args.resume:
            raise sl.ShardingError(
                f"{'--resume' if args.resume else f'--save-every {args.save_every}'} needs "
                "--checkpoint DIR (the folder the checkpoints go to)")
        return None
    return Checkpointing(args.checkpoint, save_every=args.save_every, resume=args.resume)


def _cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    layout = _layout(args)
    console.print(f"simulating {layout.model.name} on {layout.mesh!r}: {layout.mesh.size} "
                  "ranks in this process")
    if args.inspect:
        ins = inspect(layout, args.inspect, phase=args.phase, microbatch=args.microbatch,
                      stop=_debugger if args.pdb else None)
        if args.rank is not None and args.rank not in ins.values:
            raise sl.ShardingError(
                f"--rank {args.rank}: {args.inspect} runs on ranks {sorted(ins.values)} of "
                f"{layout.mesh!r}")
        print_inspection(ins, console, rank=args.rank)
        return EXIT_OK
    if args.memory:
        return EXIT_CHECK if print_memory_check(layout, console) else EXIT_OK
    printer = StepPrinter(args.steps, console, "simulate")
    with printer.progress:
        _, parity = simulate(layout, steps=args.steps, check=args.check, data=_data(args),
                             lr=args.lr, on_step=printer, checkpoint=_checkpointing(args))
    printer.summary()
    return _report(parity, console)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str], console: Console) -> int:
    layout = _layout(args)
    check = CheckMode.parse(args.check_collectives)
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
                return EXIT_BAD_INPUT
        console.print(f"launching torchrun: {layout.mesh.size} processes for {layout.mesh!r}")
        return launch_torchrun(layout.mesh.size, argv, timeout=args.timeout)
    if args.inspect:
        return _inspect_run(layout, args.inspect)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    printer = StepPrinter(args.steps, console, "run")
    with printer.progress if rank0 else contextlib.nullcontext():
        result, parity = run(layout, steps=args.steps, check=args.check, data=_data(args),
                             lr=args.lr, on_step=printer if rank0 else None,
                             checkpoint=_checkpointing(args),
                             check_collectives=check)
    if rank0:
        printer.summary()
    if result.bubble and rank0:
        console.print("pipeline bubble, measured from every stage's compute timestamps, per "
                      "step: " + ", ".join(f"{b:.1%}" for b in result.bubble))
    if args.schedule_json and rank0:
        sched = RankSchedules(layout.mesh, {"name": layout.model.name}, result.rank_records)
        out = schedule_json(sched)
        out["losses"] = [step[0] for step in result.losses]  # rank 0's loss per step
        if result.bubble:
            out["bubble"] = {"measured": result.bubble}
        with open(args.schedule_json, "w") as f:
            json.dump(out, f)
    if parity is None or (not rank0 and parity.ok):
        return EXIT_OK
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

    dist.init_process_group(device_and_backend()[1])  # one group: inspect reuses it
    with process_group_closed():
        ins = inspect(layout, site, run_mode=True)
        lines = "\n".join(f"{site} forward: {describe_value(v)}" for v in ins.values.values())
        print_ranks(lines, layout.mesh)
    return EXIT_OK


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """ShardingWarnings print as one ``warning:`` line on stderr (once each)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = str(message)
        if issubclass(category, sl.ShardingWarning) and text not in seen:
            seen.add(text)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", sl.ShardingWarning)
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in ("run", "simulate") and is_script(argv[1]):
        try:
            return script_command(argv)
        except sl.ShardingError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    args = build_parser().parse_args(argv)
    quiet_dtensor_warnings()
    # a pipe or a log file gets wide tables instead of rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        with _warnings_as_lines():
            if args.command == "explain":
                return _cmd_explain(args, console)
            if args.command == "simulate":
                return _cmd_simulate(args, console)
            if args.command == "bench":
                return cmd_bench(args, argv, _layout(args), console)
            if args.command == "plan":
                return cmd_plan(args, console)
            if args.command == "calibrate":
                return cmd_calibrate(args, console)
            return _cmd_run(args, argv, console)
    except sl.ShardingError as e:
        if not report_worker_error(str(e)):  # a torchrun worker hands it to the launcher
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - one paragraph, never a raw traceback
        if os.environ.get("SHARDLANG_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = (f"{args.command} {args.model} on --mesh {args.mesh} failed inside torch: "
               f"{type(e).__name__}: {first} (set SHARDLANG_DEBUG=1 for the traceback; please "
               "report it if the layout passes 'shardlang explain')")
        if not report_worker_error(msg):
            print(f"error: {msg}", file=sys.stderr)
        return EXIT_TORCH
