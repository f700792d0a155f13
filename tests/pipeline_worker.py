"""A torchrun worker that runs several layouts of one world size in one launch.

    torchrun --standalone --nproc-per-node N tests/pipeline_worker.py OUT.json SPEC...

SPEC is ``model/mesh/schedule/microbatches[/virtual]``, e.g. ``gpt-tiny/pp=2,dp=2/1f1b/2``
(``model/mesh/-/-`` without a pipeline).
Each layout trains 5 steps with ``--check`` semantics; rank 0 writes, per SPEC, whether
every rank matched the single-device model, rank 0's losses, every rank's recorded
schedule and the measured bubble.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

import shardlang as sl
from lowering.run import Layout, run
from lowering.run.registry import resolve
from lowering.run.session import process_group_closed


def layout_of(spec: str) -> Layout:
    model, mesh, schedule, m, *v = spec.split("/")
    if schedule == "-":  # no pipeline: tests.hf_models:llama/tp=2/-/-
        return Layout(resolve(model), sl.Mesh.parse(mesh))
    return Layout(resolve(model), sl.Mesh.parse(mesh), schedule=schedule, microbatches=int(m),
                  virtual=int(v[0]) if v else None)


def main(out: str, specs: list[str]) -> None:
    dist.init_process_group("gloo")  # one group for every layout: run() reuses it
    with process_group_closed():  # barrier, destroy, and let gloo's threads finish
        _run_all(out, specs)


def _run_all(out: str, specs: list[str]) -> None:
    results = {}
    for spec in specs:
        lay = layout_of(spec)
        result, parity = run(lay, steps=5, check=True)
        assert parity is not None
        everyone: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (parity.ok, parity.lines[-1]))
        ok = [bool(e[0]) for e in everyone]  # type: ignore[index]
        results[spec] = {
            "ok": ok, "lines": [e[1] for e in everyone],  # type: ignore[index]
            "losses": [s[0] for s in result.losses],
            "ranks": {str(r): [x.json(lay.mesh, r) for x in recs]
                      for r, recs in result.rank_records.items()},
            "bubble": result.bubble,
        }
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
