"""``shardlang run`` outside torchrun: launch torchrun with one process per rank.

The launch runs torch's own launcher (``torch.distributed.run``) in a child process, so a
launch that outlives its timeout can be stopped. A worker that fails with a
:class:`shardlang.ShardingError` writes its one-paragraph message to a file in the
launch's error folder instead of stderr; after the launch the messages are printed once
(one paragraph per distinct message, with the ranks that raised it), and torchrun's
own traceback is not shown. Any other failure (a crash, a killed rank) is summarised in
one line per failed rank.

Multi-node is plain torchrun: ``torchrun_args`` (``--nnodes 2 --node-rank 0
--rdzv-endpoint HOST:PORT``) replace ``--standalone``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

__all__ = ["launch_torchrun", "report_worker_error", "ERRORS_ENV"]

#: Set in every worker of a ``shardlang run`` launch: where a worker's error message goes.
ERRORS_ENV = "SHARDLANG_ERRORS"


def report_worker_error(message: str) -> bool:
    """In a worker of a ``shardlang run`` launch, hand ``message`` to the launcher (which
    prints it once for all ranks); elsewhere do nothing. True when handed over."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return False
    Path(folder, f"rank{os.environ.get('RANK', '0')}.txt").write_text(message)
    return True


def launch_torchrun(nproc: int, argv: Sequence[str], *, timeout: float,
                    torchrun_args: Sequence[str] = (), script: str | None = None,
                    env: dict[str, str] | None = None) -> int:
    """Re-run this command (or, with ``script``, that Python file with ``argv``) under
    torchrun with ``nproc`` processes per node (``--standalone``: a free port each time,
    unless ``torchrun_args`` give a multi-node rendezvous); a launch that outlives
    ``timeout`` seconds is stopped."""
    with tempfile.TemporaryDirectory(prefix="shardlang-errors-") as errors:
        target = [script] if script else ["-m", "lowering"]
        multi = any(a.startswith(("--nnodes", "--rdzv", "--master")) for a in torchrun_args)
        cmd = [sys.executable, __file__,  # as a script: torch only, not all of lowering
               *([] if multi else ["--standalone"]), *torchrun_args,
               f"--nproc-per-node={nproc}", *target, *argv]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               ERRORS_ENV: errors, **(env or {})}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _print_errors(errors)
            print(f"error: torchrun did not finish within {timeout:.0f} s and was stopped "
                  "(a collective that never completes looks like this; see --timeout)",
                  file=sys.stderr)
            return 124
        _print_errors(errors)
        return code


def _print_errors(folder: str) -> bool:
    """Print each distinct worker error once, with its ranks; True if there were any."""
    by_text: dict[str, list[int]] = {}
    for f in sorted(Path(folder).glob("rank*.txt"), key=lambda p: int(p.stem[4:])):
        by_text.setdefault(f.read_text().strip(), []).append(int(f.stem[4:]))
    for text, ranks in by_text.items():
        who = "" if len(ranks) == 1 else f" (reported by ranks {', '.join(map(str, ranks))})"
        print(f"error: {text}{who}", file=sys.stderr)
    return bool(by_text)


def _torchrun(args: list[str]) -> int:
    """torch's launcher in this process: workers' failures become one line each (a
    ShardingError's message is printed by the parent), never torchrun's traceback."""
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        errors = os.environ.get(ERRORS_ENV, "")
        codes = []
        for rank, failure in sorted(e.failures.items()):
            code = failure.exitcode
            codes.append(code)
            reported = errors and Path(errors, f"rank{rank}.txt").exists()
            if not reported:
                sig = f" (signal {signal.Signals(-code).name})" if code < 0 else ""
                print(f"error: rank {rank} exited with code {code}{sig}", file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(_torchrun(sys.argv[1:]))
