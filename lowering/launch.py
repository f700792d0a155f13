"""``shardlang run`` outside torchrun: launch torchrun with one process per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["launch_torchrun"]


def launch_torchrun(nproc: int, argv: Sequence[str], *, timeout: float) -> int:
    """Re-run this command under ``torchrun --standalone`` (a free port each time) with
    ``nproc`` processes; a launch that outlives ``timeout`` seconds is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "lowering", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"error: torchrun did not finish within {timeout:.0f} s and was stopped "
              "(a collective that never completes looks like this; see --timeout)",
              file=sys.stderr)
        return 124
    return proc.returncode
