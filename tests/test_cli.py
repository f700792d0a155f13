"""The command line as a user meets it: output, exit codes, the torchrun launch."""

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


def test_explain_prints_plan_schedule_and_totals(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "dp=2,tp=2")
    assert code == 0
    assert "gpt-tiny (216,192 parameters) on Mesh(dp=2, tp=2): world size 4" in out
    assert "blocks.0.mlp.up.weight" in out and "column-parallel" in out and "row-parallel" in out
    assert "Schedule of rank 0: 22 collectives" in out  # dp: one bucket of gradients
    assert out.count("exact") == 2  # dp and tp totals equal their formulas


def test_explain_shortens_a_long_schedule_and_keeps_its_ends() -> None:
    """A pipeline of many microbatches records hundreds of thousands of collectives;
    explain's table shows the first and last rows and how many it left out (rendering
    every row took minutes at 70B on 1,024 ranks)."""
    from rich.console import Console

    from lowering.printer import schedule_table

    s = explain(layout("gpt-tiny", dp=2, tp=2)).schedules
    recs = s.ranks[0]
    console = Console(record=True, width=250)
    console.print(schedule_table("t", recs, s, 0, limit=15))
    text = console.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert rows == [str(r.index) for r in recs[:5]] + ["..."] + [str(r.index) for r in recs[-10:]]
    assert f"{len(recs) - 15:,} more collectives (every one: --json)" in text
    console.print(schedule_table("t", recs, s, 0, limit=len(recs)))  # fits: every row
    assert "more collectives" not in console.export_text()


def test_explain_all_ranks_groups_identical_schedules(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "dp=2,tp=2", "--all-ranks")
    assert code == 0
    assert "Schedule of ranks 0-3" in out and "Schedule of rank 1" not in out


def test_explain_rank_shows_that_ranks_groups(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "dp=2,tp=2", "--rank", "3", "--json")
    assert code == 0
    d = json.loads(out)
    assert list(d["ranks"]) == ["3"] and d["ranks"]["3"][0]["group"] == [2, 3]


def test_simulate_prints_each_step_and_checks(cli) -> None:
    code, out, _ = cli("simulate", "mlp", "--mesh", "dp=2,tp=2", "--steps", "3", "--check")
    assert code == 0
    assert out.count("(4 ranks agree)") == 3 and "check passed" in out


def test_simulate_trains_on_a_text_file(cli, tmp_path) -> None:
    text = tmp_path / "poem.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    code, out, _ = cli("simulate", "gpt-tiny", "--mesh", "dp=2", "--steps", "2", "--data",
                       str(text), "--check")
    assert code == 0 and "check passed" in out
    code, _, err = cli("simulate", "gpt-tiny", "--mesh", "dp=2", "--data", str(tmp_path / "no"))
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("entry", [["-m", "lowering"], ["-c", "from lowering.cli import main; main()"]])
def test_help_runs(entry: list[str]) -> None:
    p = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "explain" in p.stdout and "simulate" in p.stdout


@pytest.mark.torchrun
def test_run_mode_parity_and_schedule_under_torchrun(tmp_path) -> None:
    """One launch: 4 gloo processes, dp=2 x tp=2, loss and gradients checked on every rank,
    and rank 0's recorded schedule equals dry mode's."""
    out = tmp_path / "run.json"
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "run", "gpt-tiny", "--mesh", "dp=2,tp=2",
         "--steps", "3", "--check", "--timeout", "240", "--schedule-json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "launching torchrun: 4 processes" in p.stdout and "check passed" in p.stdout
    got = json.loads(out.read_text())
    ref = reference(PRESETS["gpt-tiny"].factory, ArithmeticSequences(), TrainConfig(steps=3))
    for step, (loss, (want,)) in enumerate(zip(got["losses"], ref.losses)):
        assert abs(loss - want) <= (1e-5 if step == 0 else 1e-4), (step, loss, want)
    dry = explain(layout(dp=2, tp=2)).schedules
    want_sched = [r.json(dry.mesh, 0) for r in dry.ranks[0]]
    assert got["ranks"]["0"] == want_sched
