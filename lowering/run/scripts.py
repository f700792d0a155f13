"""A user's own training script under shardlang: ``shardlang simulate SCRIPT.py --mesh M``
runs it in this process (every rank simulated), ``shardlang run SCRIPT.py --mesh M`` under
torchrun with one process per rank. Either way ``lowering.parallelize(model)`` (no mesh)
takes ``M``, and the arguments after ``--`` reach the script as ``sys.argv[1:]``.

Multi-node is plain torchrun: the torchrun flags ``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--rdzv-backend``, ``--rdzv-id``, ``--master-addr``,
``--master-port`` and ``--max-restarts`` pass through (each node runs mesh size / nnodes
processes)."""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import shardlang as sl
from lowering.run import parallelize
from lowering.run.launch import launch_torchrun

__all__ = ["simulate_script", "run_script", "TORCHRUN_FLAGS", "is_script"]

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
