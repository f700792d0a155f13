"""Rank-local debugging: shardings, inspected values, ordered output, hangs predicted and
stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

import shardlang as sl
from lowering.debug import blocks, divergences, inspect, rank_prefix
from lowering.run import Layout, explain
from lowering.run.registry import resolve
from lowering.plan import microbatch_rows
from models.datasets import ArithmeticSequences

ROOT = Path(__file__).resolve().parents[1]


def test_blocks_follow_the_placements() -> None:
    mesh = sl.Mesh(dp=2, tp=2)
    got = blocks((8, 6), (Shard(0), Shard(1)), mesh)
    assert [b.ranges for b in got.values()] == [((0, 4), (0, 3)), ((0, 4), (3, 6)),
                                                 ((4, 8), (0, 3)), ((4, 8), (3, 6))]
    # two mesh axes on one dim: dp splits first, tp splits dp's block (as DTensor does)
    got = blocks((8,), (Shard(0), Shard(0)), mesh)
    assert [b.ranges[0] for b in got.values()] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    got = blocks((4, 4), (Replicate(), Partial()), mesh)
    assert all(b.ranges == ((0, 4), (0, 4)) and b.partial == ("tp",) for b in got.values())
    assert rank_prefix(sl.Mesh(pp=2, dp=2, tp=2), 5) == "[r5 pp=1 dp=0 tp=1]"


def test_show_a_parameter_and_an_activation(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "pp=2,dp=2,tp=2",
                       "--show", "blocks.3.attn.q.weight", "--show", "blocks.1.mlp")
    assert code == 0
    assert "blocks.3.attn.q.weight (64, 64): spec P('tp', None) -> placements dp:R tp:S(0); " \
           "held by pp=1" in out
    assert "│ 0:32          │ ranks 4, 6 │" in out and "│ 32:64         │ ranks 5, 7 │" in out
    # the row-parallel output before its all-reduce: partial sums over tp, batch over dp
    assert "blocks.1.mlp (8, 32, 64) -> placements dp:S(0) tp:P(sum)" in out
    assert "[0:4, 0:32, 0:64] partial over tp" in out and "[4:8, 0:32, 0:64] partial over tp" in out
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "tp=2", "--show", "blocks.0.atn")
    assert code == 2 and "did you mean" in err


def _reference_activation(site: str, *, batch: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    model = resolve("gpt-tiny").build(seed=0)
    idx, _ = ArithmeticSequences(256).batch(0, batch, 32)
    if rows is not None:
        idx = idx[rows]
    seen: list[torch.Tensor] = []
    model.get_submodule(site).register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    model(idx)
    return seen[0]


def _assert_blocks_equal(ins, full: torch.Tensor) -> None:
    got = blocks(ins.shape, ins.placements, ins.mesh)
    assert ins.values, "no rank captured"
    for r, v in ins.values.items():
        sl_ = tuple(slice(a, b) for a, b in got[r].ranges)
        torch.testing.assert_close(v, full[sl_], rtol=1e-5, atol=1e-5, msg=f"rank {r}")


def test_inspect_every_rank_equals_its_block_of_the_single_device_value() -> None:
    lay = Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2, sp=2))
    ins = inspect(lay, "blocks.0.mlp.up")
    assert sorted(ins.values) == list(range(8)) and ins.shape == (8, 32, 256)
    _assert_blocks_equal(ins, _reference_activation("blocks.0.mlp.up", batch=8))


def test_inspect_a_pipeline_stage_boundary_per_microbatch() -> None:
    lay = Layout(resolve("gpt-tiny"), sl.Mesh(pp=2, dp=2, tp=2), microbatches=2)
    rows = microbatch_rows(16, 2, 2)
    full = _reference_activation("blocks.2.ln1", batch=16, rows=rows)  # first layer of pp=1
    for mb in (0, 1):
        ins = inspect(lay, "blocks.2.ln1", microbatch=mb)
        assert sorted(ins.values) == [4, 5, 6, 7]  # the second stage's ranks
        _assert_blocks_equal(ins, full[mb * 8:(mb + 1) * 8])
    back = inspect(lay, "blocks.1", phase="backward")  # the gradient the boundary sends back
    assert sorted(back.values) == [0, 1, 2, 3] and back.shape == (8, 32, 64)
    # before the stack: every stage runs the embedding, only the first stage's is real
    emb = inspect(lay, "wpe")
    assert sorted(emb.values) == [0, 1, 2, 3]


def test_inspect_and_show_on_all_five_axes(cli) -> None:
    lay = Layout(resolve("gpt-moe-tiny"), sl.Mesh(pp=2, dp=2, ep=2, sp=2, tp=2))
    ins = inspect(lay, "blocks.3.mlp")  # an MoE layer on the second stage
    assert sorted(ins.values) == list(range(16, 32))
    # a microbatch of 8 rows over dp*ep = 4, the sequence (32) over sp = 2, tp replicated
    assert ins.shape == (8, 32, 64)
    assert all(v.shape == (2, 16, 64) for v in ins.values.values())
    got = blocks(ins.shape, ins.placements, lay.mesh)
    assert {got[r].ranges for r in ins.values} == {
        ((b, b + 2), (s, s + 16), (0, 64)) for b in (0, 2, 4, 6) for s in (0, 16)}
    code, out, _ = cli("explain", "gpt-moe-tiny", "--mesh", "pp=2,dp=2,ep=2,sp=2,tp=2",
                       "--show", "blocks.1.mlp.w_up")
    assert code == 0 and "held by pp=0" in out and "16 rank(s)" in out


def test_simulate_inspect_cli(cli) -> None:
    code, out, _ = cli("simulate", "gpt-tiny", "--mesh", "dp=2,tp=2", "--inspect", "blocks.0.attn",
                       "--phase", "backward", "--rank", "3")
    assert code == 0
    assert "blocks.0.attn (backward)" in out and "[r3 dp=1 tp=1]" in out and "[r0" not in out


# -- a hang, predicted -------------------------------------------------------------------------
def test_divergences_name_both_ranks_and_collectives() -> None:
    for factory, needle in (("models.debugging:rank_branch", "rank 0 issues all_reduce over tp of []"),
                            ("models.debugging:uneven", "[8, 31, 32]")):
        lay = Layout(resolve(factory), sl.Mesh(tp=2))
        found = divergences(explain(lay, ranks=[0, 1]).schedules.ranks, lay.mesh)
        assert len(found) == 1 and found[0].ranks == (0, 1) and found[0].axis == "tp"
        assert needle in str(found[0]) and "would hang" in str(found[0])
    healthy = Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2))
    assert divergences(explain(healthy, ranks=[0, 1, 2, 3]).schedules.ranks, healthy.mesh) == []


# -- run mode: torchrun ----------------------------------------------------------------------------
def _run(*args: str, check_timeout: int = 10, timeout: int = 150) -> tuple[int, str, float]:
    env = {**os.environ, "SHARDLANG_CHECK_TIMEOUT": str(check_timeout), "NO_COLOR": "1"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "lowering", "run", *args], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.time() - t0


@pytest.mark.torchrun
def test_a_diverging_run_ends_with_a_clear_error_not_a_hang() -> None:
    code, out, _ = _run("models.debugging:rank_branch", "--mesh", "tp=2", "--steps", "1")
    assert code == 2 and "pre-launch check: a hang is predicted" in out
    assert "launching torchrun" not in out
    for factory, needle in (("models.debugging:rank_branch", "rank 0 issues all_reduce over tp of []"),
                            ("models.debugging:uneven", "of [8, 31, 32]")):
        code, out, took = _run(factory, "--mesh", "tp=2", "--steps", "1", "--launch-anyway")
        assert code != 0 and took < 60, (took, out[-2000:])
        assert re.search(r"error: ranks [01] and [01] \(group \[0, 1\]\) disagree at their "
                         r"collective #1 on tp", out), out[-3000:]
        assert needle in out


@pytest.mark.torchrun
def test_run_mode_inspect_prints_in_rank_order_and_equals_simulate() -> None:
    code, out, _ = _run("gpt-tiny", "--mesh", "dp=2,tp=2", "--steps", "1", "--lr", "0",
                        "--inspect", "blocks.0.mlp.up")
    assert code == 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if "blocks.0.mlp.up forward: local" in ln]
    prefixes = [ln.split("]")[0] + "]" for ln in lines]
    assert prefixes == ["[r0 dp=0 tp=0]", "[r1 dp=0 tp=1]", "[r2 dp=1 tp=0]", "[r3 dp=1 tp=1]"]
    sim = inspect(Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2)), "blocks.0.mlp.up")
    for r, line in enumerate(lines):
        v = sim.values[r].float()
        norm = float(re.search(r"norm (\S+)", line).group(1))
        mx = float(re.search(r"max (\S+)", line).group(1))
        assert norm == pytest.approx(v.norm().item(), rel=1e-5)
        assert mx == pytest.approx(v.max().item(), rel=1e-5)


def test_stop_runs_mid_step_with_every_rank_and_pdb_stops_there() -> None:
    lay = Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2))
    seen: list[tuple[int, list[int]]] = []

    def stop(ins) -> None:  # noqa: ANN001 - called at the site, before the step ends
        seen.append((len(ins.values), [r for r in sorted(ins.values)]))
    final = inspect(lay, "blocks.1.attn", stop=stop)
    assert seen == [(4, [0, 1, 2, 3])] and sorted(final.values) == [0, 1, 2, 3]
    # the CLI's --pdb: a debugger session driven through stdin prints a rank's value
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "simulate", "gpt-tiny", "--mesh", "dp=2,tp=2",
         "--inspect", "blocks.1.attn", "--pdb"],
        input="p tuple(ins.values[3].shape)\nc\n", capture_output=True, text=True,
        timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stopped at blocks.1.attn (forward)" in p.stdout and "(4, 32, 64)" in p.stdout
