"""A user's own script under ``shardlang run`` (torchrun, one process per rank) and
``shardlang simulate``: the same losses as one device; a killed rank ends the job in
bounded time and ``--resume`` continues the curve; two torchrun agents on localhost
(``--nnodes 2``) make one job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.user_loop import train

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(Path(__file__).with_name("user_loop.py"))
ROOT = Path(__file__).resolve().parents[1]


def shardlang(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lowering", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def read(path: Path) -> list[float]:
    return json.loads(path.read_text())["losses"]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    got, par = train("", steps=6)
    par.close()
    return got


def test_the_same_script_under_torchrun_and_in_one_process(tmp_path: Path,
                                                           reference: list[float]) -> None:
    out = tmp_path / "run.json"
    res = shardlang("run", SCRIPT, "--mesh", "dp=2,tp=2", "--", str(out), "--steps", "6",
                    "--hold-grads")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.read_text())["mode"] == "run"
    assert read(out) == pytest.approx(reference, rel=1e-5, abs=1e-5)
    # the gradient buckets are reused from step to step (steps 1, 3, 5 reduce into the
    # buffer of the step before), never while a user still holds a step's gradients
    # (steps 0, 2, 4 keep theirs)
    assert json.loads(out.read_text())["held_intact"] is True
    sim = tmp_path / "sim.json"
    res = shardlang("simulate", SCRIPT, "--mesh", "dp=2,tp=2", "--", str(sim), "--steps", "6",
                    "--fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(sim.read_text())["mode"] == "simulate"
    assert read(sim) == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_a_killed_rank_ends_the_job_and_resume_continues_the_curve(
        tmp_path: Path, reference: list[float]) -> None:
    ck, out = tmp_path / "ck", tmp_path / "out.json"
    t0 = time.monotonic()
    res = shardlang("run", SCRIPT, "--mesh", "dp=2", "--timeout", "120", "--", str(out),
                    "--steps", "6", "--checkpoint", str(ck), "--save-every", "1", "--kill-at", "3")
    took = time.monotonic() - t0
    assert res.returncode != 0 and took < 100, (took, res.stderr[-2000:])
    assert "rank 1 exited with code -9 (signal SIGKILL)" in res.stderr
    done = sorted(p.name for p in ck.iterdir() if (p / "shardlang.pt").exists())
    assert done == ["step-00001", "step-00002", "step-00003", "step-00004"]
    res = shardlang("run", SCRIPT, "--mesh", "dp=2", "--", str(out), "--steps", "6",
                    "--checkpoint", str(ck), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert read(out) == pytest.approx(reference[4:], rel=1e-5, abs=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_make_one_job(tmp_path: Path, reference: list[float]) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"node{k}.json" for k in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lowering", "run", SCRIPT, "--mesh", "dp=2", "--nnodes", "2",
         "--node-rank", str(k), "--rdzv-endpoint", f"127.0.0.1:{port}", "--",
         str(outs[k]), "--steps", "3"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = [p.communicate(timeout=200) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    # global rank 0 lives on node 0 and writes the losses
    assert read(outs[0]) == pytest.approx(reference[:3], rel=1e-5, abs=1e-5)


def test_torchrun_max_restarts_resumes_by_itself(tmp_path: Path, reference: list[float]) -> None:
    ck, out = tmp_path / "ck", tmp_path / "out.json"
    res = shardlang("run", SCRIPT, "--mesh", "dp=2", "--max-restarts", "1", "--", str(out),
                    "--steps", "6", "--checkpoint", str(ck), "--save-every", "1",
                    "--kill-at", "3", "--auto-resume")
    assert res.returncode == 0, res.stderr[-3000:]
    # the restarted job loaded step 4 (saved just before the kill) and ran steps 4 and 5
    assert read(out) == pytest.approx(reference[4:], rel=1e-5, abs=1e-5)


def test_the_built_in_loop_saves_and_resumes_on_another_mesh(tmp_path: Path) -> None:
    from lowering.run import Layout, simulate
    full, _ = simulate(Layout.of("gpt-tiny", "dp=2"), steps=4)
    ck = tmp_path / "ck"
    res = shardlang("simulate", "gpt-tiny", "--mesh", "dp=2,tp=2", "--steps", "2",
                    "--checkpoint", str(ck), "--save-every", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (ck / "step-00002" / "shardlang.pt").exists()
    sched = tmp_path / "s.json"
    res = shardlang("run", "gpt-tiny", "--mesh", "dp=2", "--steps", "4", "--checkpoint",
                    str(ck), "--resume", "--schedule-json", str(sched))
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(sched.read_text())["losses"]
    assert got == pytest.approx([step[0] for step in full.losses[2:]], rel=1e-5, abs=1e-5)
    res = shardlang("simulate", "gpt-tiny", "--mesh", "dp=2", "--resume")
    assert res.returncode == 2 and "--resume needs --checkpoint DIR" in res.stderr


def test_the_built_in_loop_checkpoints_a_pipeline_and_resumes_on_and_off_one(
        tmp_path: Path) -> None:
    """pp=2 x dp=2 saves in one process (every stage's layers into one checkpoint),
    torchrun's pp=2 resumes it and saves in turn (each stage its own layers), dp=2 x
    tp=2 resumes that: the curve of one uninterrupted dp=2 run, and a same-layout resume
    of the pipeline is bit-exact."""
    from lowering.run import Layout, simulate
    from lowering.run.train import Checkpointing
    full, _ = simulate(Layout.of("gpt-tiny", "dp=2", batch=8), steps=6)
    curve = [step[0] for step in full.losses]
    ck = tmp_path / "ck"
    res = shardlang("simulate", "gpt-tiny", "--mesh", "pp=2,dp=2", "--batch", "8", "--steps",
                    "2", "--checkpoint", str(ck), "--save-every", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (ck / "step-00002" / "shardlang.pt").exists()
    again, _ = simulate(Layout.of("gpt-tiny", "pp=2,dp=2", batch=8), steps=4,
                        checkpoint=Checkpointing(str(ck), resume=True))
    piped, _ = simulate(Layout.of("gpt-tiny", "pp=2,dp=2", batch=8), steps=4)
    assert again.losses == piped.losses[2:]  # bit-exact, every rank
    sched = tmp_path / "s.json"
    res = shardlang("run", "gpt-tiny", "--mesh", "pp=2", "--batch", "8", "--steps", "4",
                    "--checkpoint", str(ck), "--resume", "--save-every", "4",
                    "--schedule-json", str(sched))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(sched.read_text())["losses"] == pytest.approx(curve[2:4], rel=1e-5,
                                                                    abs=1e-5)
    assert (ck / "step-00004" / "shardlang.pt").exists()
    last, _ = simulate(Layout.of("gpt-tiny", "dp=2,tp=2", batch=8), steps=6,
                       checkpoint=Checkpointing(str(ck), resume=True))
    assert [step[0] for step in last.losses] == pytest.approx(curve[4:], rel=1e-5, abs=1e-5)


def test_a_pipelined_script_under_torchrun_records_what_simulate_records_and_reshards(
        tmp_path: Path) -> None:
    from tests import user_pipeline
    ref, par = user_pipeline.train("", steps=6)
    par.close()
    _, par = user_pipeline.train("pp=2,dp=2", steps=3)
    simulated = {r: user_pipeline.schedule_rows(par, r) for r in range(4)}
    par.close()
    script, out, ckpt = str(ROOT / "tests" / "user_pipeline.py"), tmp_path / "pipe.json", \
        tmp_path / "ckpt"
    res = shardlang("run", script, "--mesh", "pp=2,dp=2", "--", str(out), "--steps", "3",
                    "--save", str(ckpt), "--save-at", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["mode"] == "run"
    assert got["losses"] == pytest.approx(ref[:3], rel=1e-5, abs=1e-5)
    for r in range(4):
        part = json.loads(Path(f"{out}.rank{r}" if r else out).read_text())
        assert part["schedules"][str(r)] == simulated[r], f"rank {r}"
    # the pipelined checkpoint reshards: onto dp=4 (simulated) and pp=2 (torchrun)
    resumed, par = user_pipeline.train("dp=4", steps=6, load=str(ckpt))
    par.close()
    assert resumed == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)
    res = shardlang("run", script, "--mesh", "pp=2", "--", str(out), "--steps", "6",
                    "--load", str(ckpt), "--schedule", "interleaved", "--microbatches", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert read(out) == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)
    # interleaved 1F1B (2 chunks per rank): torchrun's schedule is the one simulated
    _, par = user_pipeline.train("pp=2", steps=6, load=str(ckpt), schedule="interleaved",
                                 microbatches=4)
    for r in range(2):
        part = json.loads(Path(f"{out}.rank{r}" if r else out).read_text())
        assert part["schedules"][str(r)] == user_pipeline.schedule_rows(par, r), f"rank {r}"
    par.close()
