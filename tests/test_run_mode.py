"""Run mode with 8 gloo processes: the 3-axis layouts of issue 3, one launch each (the
built-in loop with FSDP in one of them: its parameters refilled in place each step)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowering.run import explain
from lowering.run.train import TrainConfig, reference
from models import PRESETS
from models.datasets import ArithmeticSequences
from tests.conftest import layout


@pytest.mark.torchrun
@pytest.mark.parametrize(("model", "mesh", "fsdp"), [("gpt-moe-tiny", "dp=2,tp=2,ep=2", False),
                                                     ("gpt-tiny", "dp=2,sp=2,tp=2", True)])
def test_eight_processes_match_single_device(model: str, mesh: str, fsdp: bool,
                                             tmp_path) -> None:
    out = tmp_path / "run.json"
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "run", model, "--mesh", mesh, "--steps", "2",
         "--check", "--timeout", "400", "--schedule-json", str(out)]
        + (["--fsdp"] if fsdp else []),
        capture_output=True, text=True, timeout=450)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "launching torchrun: 8 processes" in p.stdout and "check passed" in p.stdout
    got = json.loads(out.read_text())
    ref = reference(PRESETS[model].factory, ArithmeticSequences(), TrainConfig(steps=2))
    for step, (loss, (want,)) in enumerate(zip(got["losses"], ref.losses)):
        assert abs(loss - want) <= (1e-5 if step == 0 else 1e-4), (step, loss, want)
    sizes = dict(kv.split("=") for kv in mesh.split(","))
    dry = explain(layout(model, fsdp=fsdp, **{k: int(v) for k, v in sizes.items()})).schedules
    assert got["ranks"]["0"] == [r.json(dry.mesh, 0) for r in dry.ranks[0]]
