"""A user's own training script under shardlang: ``shardlang simulate SCRIPT.py --mesh M``
runs it in this process (every rank simulated), ``shardlang run SCRIPT.py --mesh M`` under
torchrun with one process per rank. Either way ``lowering.parallelize(model)`` (no mesh)
takes ``M``, and the arguments after ``--`` reach the script as ``sys.argv[1:]``.

Multi-node is plain torchrun: the torchrun flags ``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--rdzv-backend``, ``--rdzv-id``, ``--master-addr``,
``--master-port`` and ``--max-restarts`` pass through (each node runs mesh size / nnodes
processes)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import shardlang as sl
from lowering.run import parallelize
from lowering.run.launch import launch_torchrun

__all__ = ["simulate_script", "run_script", "TORCHRUN_FLAGS", "is_script", "script_command"]

TORCHRUN_FLAGS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id",
                  "--master-addr", "--master-port", "--max-restarts")


def is_script(model: str) -> bool:
    return model.endswith(".py")


def _check(script: str) -> Path:
    path = Path(script)
    if not path.is_file():
        raise sl.ShardingError(
            f"no script {script}: give the path of your training script (a .py file that "
            "calls lowering.parallelize), or a model name (a preset, hf:NAME or "
            "package.module:factory)")
    return path


def simulate_script(script: str, mesh: sl.Mesh, args: Sequence[str]) -> int:
    """Run ``script`` in this process with ``mesh`` as the launcher's mesh."""
    path = _check(script)
    os.environ[parallelize.MESH_ENV] = str(mesh)
    argv = sys.argv
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for par in list(parallelize._ACTIVE):
            par.close()
    return 0


def run_script(script: str, mesh: sl.Mesh, args: Sequence[str], *, timeout: float,
               torchrun_args: Sequence[str] = ()) -> int:
    """Launch ``script`` under torchrun with one process per rank of ``mesh``."""
    path = _check(script)
    nnodes = 1
    for i, a in enumerate(torchrun_args):
        if a.startswith("--nnodes"):
            value = a.split("=", 1)[1] if "=" in a else torchrun_args[i + 1]
            nnodes = int(value.split(":")[-1])
    if mesh.size % nnodes:
        raise sl.ShardingError(
            f"--nnodes {nnodes} must divide the mesh's {mesh.size} ranks ({mesh!r}); each "
            "node runs the same number of processes")
    return launch_torchrun(mesh.size // nnodes, list(args), timeout=timeout,
                           torchrun_args=torchrun_args, script=str(path),
                           env={parallelize.MESH_ENV: str(mesh)})


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"shardlang {command} SCRIPT.py",
        description=("run your own training script (it calls lowering.parallelize(model)) "
                     + ("in this process, every rank simulated" if command == "simulate"
                        else "under torchrun, one process per rank")
                     + "; arguments after -- go to the script"))
    p.add_argument("script")
    p.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. dp=2,tp=2")
    if command == "run":
        p.add_argument("--timeout", type=float, default=600,
                       help="seconds before the launch is stopped (default 600)")
        for flag in TORCHRUN_FLAGS:
            p.add_argument(flag, default=None, help="passed to torchrun (multi-node)")
    return p


def script_command(argv: list[str]) -> int:
    """``shardlang run|simulate SCRIPT.py --mesh M [-- ARGS]`` (``argv`` from the command
    on); bad input is a :class:`shardlang.ShardingError` for the CLI to print."""
    command, rest = argv[0], argv[1:]
    ours, theirs = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest \
        else (rest, [])
    args = _parser(command).parse_args(ours)
    mesh = sl.Mesh.parse(args.mesh)
    if command == "simulate":
        return simulate_script(args.script, mesh, theirs)
    given = {f: getattr(args, f[2:].replace("-", "_")) for f in TORCHRUN_FLAGS}
    flags = [f"{f}={v}" for f, v in given.items() if v is not None]
    return run_script(args.script, mesh, theirs, timeout=args.timeout, torchrun_args=flags)
