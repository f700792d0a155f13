"""Sequence parallelism: ring attention, load balancing, Megatron-SP; and 4D layouts."""

from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import shardlang as sl
from lowering.run.functions import trace_function
from lowering.run import explain, simulate
from lowering.parallel.sequence import causal_work, load_balanced_order
from lowering.run.train import TrainConfig, reference
from models import PRESETS
from models.datasets import ArithmeticSequences
from tests.conftest import layout

B, S, E, H = 8, 32, 64, 4  # gpt-tiny


@pytest.fixture(scope="module")
def single_device():
    cfg = TrainConfig(steps=3, batch=B, seq=S, keep_grads=True)
    return {name: reference(PRESETS[name].factory, ArithmeticSequences(), cfg)
            for name in ("gpt-tiny", "gpt-moe-tiny")}


def _assert_matches(got, ref) -> None:
    for name, per_rank in got.grads.items():
        for g in per_rank:
            torch.testing.assert_close(g, ref.grads[name][0], rtol=1e-5, atol=1e-5, msg=name)
    for step, (losses, (want,)) in enumerate(zip(got.losses, ref.losses)):
        assert max(abs(v - want) for v in losses) <= (1e-5 if step == 0 else 1e-4), step


@pytest.mark.parametrize(("model", "kw"), [
    ("gpt-tiny", {"sp": 2}),
    ("gpt-tiny", {"sp": 4}),
    ("gpt-tiny", {"sp": 2, "load_balance": True}),
    ("gpt-tiny", {"sp": 4, "load_balance": True}),
    ("gpt-tiny", {"dp": 2, "sp": 2}),
    ("gpt-tiny", {"tp": 2, "sp": 2}),
    ("gpt-tiny", {"tp": 2, "rules": "norm_seq=tp"}),
    ("gpt-tiny", {"dp": 2, "sp": 2, "fsdp": True}),
    ("gpt-moe-tiny", {"dp": 2, "tp": 2, "sp": 2, "ep": 2}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{v}" for k, v in v.items()))
def test_sequence_layouts_match_single_device(model: str, kw: dict, single_device) -> None:
    kw = dict(kw)
    lb = kw.pop("load_balance", False)
    lay = layout(model, **kw)
    if lb:
        from dataclasses import replace

        lay = replace(lay, load_balance=True)
    got, parity = simulate(lay, steps=3, check=True)
    _assert_matches(got, single_device[model])
    assert parity is not None and parity.ok
    assert len(got.losses[0]) == lay.mesh.size


def test_ring_attention_function_matches_sdpa_forward_and_backward() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 8, requires_grad=True) for _ in range(3))
    rules = sl.Rules(batch="dp", heads="tp", seq="sp")
    t = trace_function(lambda q, k, v: sl.attention(q, k, v, causal=True), [q, k, v],
                       mesh=sl.Mesh(sp=4), rules=rules, backward=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(t.output, want.detach(), rtol=1e-5, atol=1e-5)
    ops = collections.Counter((r.phase.value, r.op.value, r.axis) for r in t.records)
    assert ops == {("forward", "permute", "sp"): 3, ("backward", "permute", "sp"): 3}
    assert {r.bytes for r in t.records} == {2 * 2 * 4 * (32 // 4) * 8 * 4}
    assert all(r.wire_bytes == r.bytes for r in t.records)  # a permute sends its block


@pytest.mark.parametrize("n", [2, 4])
def test_ring_schedule_per_attention_layer(n: int) -> None:
    recs = explain(layout(sp=n)).schedules.ranks[0]
    for i in range(4):
        fwd = [r for r in recs if r.site == f"blocks.{i}.attn" and r.phase.value == "forward"]
        assert [r.op.value for r in fwd] == ["permute"] * (n - 1)
        assert {r.bytes for r in fwd} == {2 * B * (S // n) * E * 4}  # K and V of one block
    def peers(phase: str) -> set[tuple[int, ...]]:
        return {tuple(r.json(sl.Mesh(sp=n), 0)["group"]) for r in recs
                if r.op.value == "permute" and r.phase.value == phase}

    assert peers("forward") == {(0, 1)}       # K/V go to the next rank
    assert peers("backward") == {(0, n - 1)}  # their gradients come back the other way
    assert all(r.axis == "sp" for r in recs)


def test_megatron_sp_moves_the_same_bytes_as_the_all_reduces_it_replaces() -> None:
    plain = explain(layout(tp=2)).schedules.ranks[0]
    msp = explain(layout(tp=2, rules="norm_seq=tp")).schedules.ranks[0]

    def block(recs):
        return [r for r in recs if r.site == "blocks.1" and r.axis == "tp"]

    assert collections.Counter((r.phase.value, r.op.value) for r in block(plain)) == {
        ("forward", "all_reduce"): 2, ("backward", "all_reduce"): 2}
    assert collections.Counter((r.phase.value, r.op.value) for r in block(msp)) == {
        ("forward", "all_gather"): 2, ("forward", "reduce_scatter"): 2,
        ("backward", "all_gather"): 2, ("backward", "reduce_scatter"): 2}
    assert sum(r.wire_bytes for r in block(msp)) == sum(r.wire_bytes for r in block(plain))
    assert {r.bytes for r in block(msp)} == {B * S * E * 4}


def test_load_balanced_layout_evens_causal_work() -> None:
    order = load_balanced_order(16, 2)
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    plain, balanced = causal_work(32, 4, balanced=False), causal_work(32, 4, balanced=True)
    assert sum(plain) == sum(balanced) == 32 * 33 // 2
    assert max(plain) / min(plain) > 6 and max(balanced) == min(balanced)


def test_sequence_errors(cli) -> None:
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "sp=3")
    assert code == 2 and "mesh axis 'sp' (size 3)" in err and "'seq' (size 32)" in err
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "sp=2", "--seq", "30", "--load-balance")
    assert code == 2 and "load-balanced" in err and "(size 4)" in err
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "sp=2", "--seq", "6", "--load-balance")
    assert code == 2 and "choose sp in {1, 3}" in err


def test_explain_shows_work_per_rank(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "sp=4")
    assert code == 0 and "Causal attention work per sp rank, contiguous" in out
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "sp=4", "--load-balance")
    assert code == 0 and "load-balanced" in out and out.count("100%") == 4


def test_sub_mesh_coordinates_survive_address_reuse() -> None:
    """Simulate mode's LocalTensorMode caches a mesh's rank coordinates by id(): a sub-mesh
    made per call and freed let the next one (another axis, same address) read the old
    axis' coordinates, so the ring permute sent K/V to the wrong ranks (a flaky CI failure
    on pp=2,dp=2,ep=2,sp=2). Each axis' sub-mesh must report its own coordinate."""
    import gc

    from lowering.parallel.shard_map import submesh
    from lowering.run.session import Mode, session

    with session(sl.Mesh(dp=2, ep=2, sp=2), Mode.SIMULATE) as sess:
        strides = {"dp": 4, "ep": 2, "sp": 1}
        for _ in range(3):
            for axis, stride in strides.items():
                node = submesh(sess.dmesh, axis).get_local_rank().node
                assert node._local_ints == {r: r // stride % 2 for r in range(8)}, axis
                gc.collect()  # a sub-mesh sits in a reference cycle: free it now


def test_ring_attention_saves_no_score_matrix_and_matches_with_gqa() -> None:
    """The ring keeps its queries, the K/V blocks it saw, the output and the log-sum-exp
    for backward: nothing of size (c, c), so long sequences fit. Grouped-query K/V (2
    heads for 4 query heads) give the single-device output (their gradients: the HF
    Llama parity under sp in test_hf)."""
    torch.manual_seed(0)
    n, b, h, hk, s, d = 4, 2, 4, 2, 64, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    k, v = (torch.randn(b, hk, s, d, requires_grad=True) for _ in range(2))
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    rules = sl.Rules(batch="dp", heads="tp", seq="sp")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        t = trace_function(lambda q, k, v: sl.attention(q, k, v, causal=True), [q, k, v],
                           mesh=sl.Mesh(sp=n), rules=rules, backward=True)
    c = s // n
    assert saved and not [sh for sh in saved if sh[-2:] == (c, c)], saved
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(t.output, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("balanced", [False, True])
def test_ring_model_flops_do_not_depend_on_the_layout_and_skipped_blocks_take_no_time(
        balanced: bool) -> None:
    """A dry trace counts every (query, key) pair of the causal sequence in the model's
    FLOPs, as one kernel over the whole sequence counts them, whichever sp layout; the
    time counts what a rank runs. Without load balancing the busiest rank (n-1) runs
    half its own block and every earlier one: (n - 1/2) of n blocks' FLOPs; balanced,
    each rank runs half of every block: 1/2."""
    n = 4

    def traced(sp: int, load_balance: bool = False) -> list:
        return list(explain(replace(layout(sp=sp), load_balance=load_balance)).compute[0].values())

    whole, ring = traced(1), traced(n, balanced)
    assert sum(c.flops for c in ring) * n == pytest.approx(sum(c.flops for c in whole), rel=1e-9)
    for c in ring:
        if c.attention_flops:
            ran = (c.attention_flops - c.skipped_flops) / c.attention_flops
            assert ran == pytest.approx(0.5 if balanced else (n - 0.5) / n, rel=1e-9)
