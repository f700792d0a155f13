"""Expert parallelism: the MoE layer on one device, its parity on ep meshes, its
hand-computed dropping, and its schedule (2 + 2 all-to-alls per MoE layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.plan import tensor_axes
from lowering.schedule import Record, totals
from lowering.run.train import TrainConfig, TrainResult, reference
from models.datasets import ArithmeticSequences
from models.gpt import GPT, GPTConfig
from models.moe import MoE, route

BATCH, SEQ = 8, 32
MOE_LAYERS = (1, 3)  # gpt-moe-tiny: every other block of 4


def moe_top1() -> nn.Module:
    """gpt-moe-tiny with Switch routing (k=1); capacity factor n_experts/k: no drops."""
    return GPT(GPTConfig(n_experts=4, top_k=1, capacity_factor=4.0, moe_every=2))


@pytest.fixture(scope="module")
def ref_top2() -> TrainResult:
    cfg = TrainConfig(steps=1, batch=BATCH, seq=SEQ, keep_grads=True)
    return reference(resolve("gpt-moe-tiny").factory, ArithmeticSequences(256), cfg)


# -- one device ------------------------------------------------------------------------
def _tiny_moe(top_k: int, capacity_factor: float) -> MoE:
    """2 experts on width 2; the router scores expert 0 by x[0] and expert 1 by x[1]."""
    torch.manual_seed(0)
    moe = MoE(embed=2, hidden=3, n_experts=2, top_k=top_k, capacity_factor=capacity_factor,
              layer=7)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    return moe


# tokens 0, 2, 3 prefer expert 0, token 1 prefers expert 1
TOKENS = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 0.0]]])  # (1, 4, 2)


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ moe.w_up[e]) @ moe.w_down[e]


def test_single_device_is_a_plain_module_for_k1_and_k2() -> None:
    for k in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_experts=4, top_k=k, capacity_factor=4.0 / k))
        assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE", "MLP", "MoE"]
        idx = torch.randint(0, 256, (2, 32))
        with sl.collecting() as got:
            logits = model(idx)
        assert logits.shape == (2, 32, 256)
        assert len(got.aux) == 2
        assert got.metrics["moe1.tokens_per_expert"].sum() == 2 * 32 * k
        assert got.metrics["moe1.dropped"] == 0
        (logits.logsumexp(-1).mean() + got.total_aux()).backward()
        for b in (model.blocks[1], model.blocks[3]):
            for p in (b.mlp.router.weight, b.mlp.w_up, b.mlp.w_down):
                assert p.grad is not None and p.grad.abs().sum() > 0


def test_top1_drops_past_capacity_in_token_order() -> None:
    moe = _tiny_moe(top_k=1, capacity_factor=0.5)  # C = ceil(0.5 * 1 * 4 / 2) = 1
    assert moe.capacity(4) == 1
    r = moe.routing(TOKENS[0])
    assert r.expert[:, 0].tolist() == [0, 1, 0, 0]
    # expert 0 has one slot: token 0 takes it, tokens 2 and 3 drop; token 1 fits expert 1
    assert r.kept[:, 0].tolist() == [True, True, False, False]
    with sl.collecting() as got:
        y = moe(TOKENS)[0]  # (4, 2)
    assert got.metrics["moe7.dropped"] == 2
    assert got.metrics["moe7.tokens_per_expert"].tolist() == [3.0, 1.0]
    assert torch.equal(y[2], torch.zeros(2)) and torch.equal(y[3], torch.zeros(2))
    probs = (TOKENS[0] @ moe.router.weight.T).softmax(-1)
    with torch.no_grad():
        for t, e in ((0, 0), (1, 1)):  # Switch gate: the raw top probability
            torch.testing.assert_close(y[t], probs[t, e] * _expert(moe, e, TOKENS[0, t]))


def test_top2_serves_every_first_choice_before_any_second_choice() -> None:
    moe = _tiny_moe(top_k=2, capacity_factor=0.75)  # C = ceil(0.75 * 2 * 4 / 2) = 3
    assert moe.capacity(4) == 3
    r = moe.routing(TOKENS[0])
    # first choices fill expert 0 with tokens 0, 2, 3 (slots 0-2) and expert 1 with token 1;
    # then second choices: token 0 -> e1 slot 1, token 1 -> e0 slot 3 (full: dropped),
    # token 2 -> e1 slot 2, token 3 -> e1 slot 3 (dropped)
    assert r.expert.tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]
    assert r.slot.tolist() == [[0, 1], [0, 3], [1, 2], [2, 3]]
    assert r.kept.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    torch.testing.assert_close(r.gate.sum(-1), torch.ones(4))  # k=2: renormalised
    with sl.collecting() as got:
        y = moe(TOKENS)[0]
    assert got.metrics["moe7.dropped"] == 2
    with torch.no_grad():
        x = TOKENS[0]
        want1 = r.gate[1, 0] * _expert(moe, 1, x[1])  # its second choice dropped
        want0 = r.gate[0, 0] * _expert(moe, 0, x[0]) + r.gate[0, 1] * _expert(moe, 1, x[0])
        torch.testing.assert_close(y[1], want1)
        torch.testing.assert_close(y[0], want0)


def test_route_capacity_counts_from_zero() -> None:
    probs = torch.tensor([[0.6, 0.4]] * 5)
    r = route(probs, top_k=1, capacity=3)
    assert r.slot[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert int(r.dropped) == 2
    assert r.dispatch().shape == (5, 2, 3) and r.dispatch().sum() == 3


def test_top_k_larger_than_n_experts_is_a_sharding_error() -> None:
    with pytest.raises(sl.ShardingError, match=r"top_k=3 and n_experts=2.*1\.\.2"):
        GPT(GPTConfig(n_experts=2, top_k=3))
    with pytest.raises(sl.ShardingError, match="capacity_factor=0"):
        GPT(GPTConfig(n_experts=2, top_k=1, capacity_factor=0))


def test_experts_not_divisible_by_ep_is_reported_by_the_cli(cli) -> None:
    code, out, err = cli("explain", "gpt-moe-tiny", "--mesh", "ep=8")
    assert code == 2
    msg = out + err
    assert "mesh axis 'ep' (size 8) must divide logical axis 'experts' (size 4)" in msg
    assert "blocks.1.mlp" in msg and "choose ep in {1, 2, 4}" in msg
    assert "Traceback" not in msg


# -- parity on meshes ------------------------------------------------------------------
@pytest.mark.parametrize("mesh,fsdp", [
    ("ep=2", False), ("ep=4", False), ("dp=2,ep=2", False), ("tp=2,ep=2", False),
    ("dp=2,ep=2", True),
], ids=["ep2", "ep4", "dp2-ep2", "tp2-ep2", "fsdp-dp2-ep2"])
def test_parity_with_one_device(mesh: str, fsdp: bool, ref_top2: TrainResult) -> None:
    lay = Layout(resolve("gpt-moe-tiny"), sl.Mesh.parse(mesh), sl.Rules.default(), fsdp=fsdp)
    result, parity = simulate(lay, steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    for layer in MOE_LAYERS:
        assert result.metrics[0][f"moe{layer}.dropped"] == 0
        assert sum(result.metrics[0][f"moe{layer}.tokens_per_expert"]) == BATCH * SEQ * 2
    assert set(result.grads) == set(ref_top2.grads)
    for name, per_rank in result.grads.items():
        want = ref_top2.grads[name][0]
        assert len(per_rank) == lay.mesh.size
        for g in per_rank:
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=name)
    assert result.losses[0] == pytest.approx([ref_top2.losses[0][0]] * lay.mesh.size,
                                             rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("mesh", ["dp=2,ep=2", "dp=2,sp=2"])
def test_fsdp_shards_the_experts_over_dp(mesh: str, cli) -> None:  # noqa: ANN001
    """The experts (run inside an sl.shard_map region) are sharded over dp too: gathered
    with their layer, their gradient leaves the region as a partial sum over dp and is
    reduce-scattered with the layer's (no dp all-reduce of an expert gradient); the wire
    equals the formulas and simulate's memory count equals the prediction."""
    lay = Layout(resolve("gpt-moe-tiny"), sl.Mesh.parse(mesh), sl.Rules.default(), fsdp=True)
    ex = explain(lay)
    dp = tensor_axes(ex.plan.mesh).index("dp")
    for layer in MOE_LAYERS:
        for w in ("w_up", "w_down"):
            p = ex.plan.param(f"blocks.{layer}.mlp.{w}")
            assert p.fsdp_dim is not None and not p.placements[dp].is_replicate(), (w, p)
    recs = ex.schedules.ranks[0]
    reduced = [r for r in recs if r.axis == "dp" and r.op.value == "all_reduce"
               and r.phase.value == "backward" and len(r.shape) == 3]  # an expert's (X, ., .)
    assert reduced == [], [(r.site, r.shape) for r in reduced]
    rec = totals(recs)["axis"]
    for axis, vol in ex.analytic.items():
        assert rec[axis]["wire_bytes"] == pytest.approx(vol.wire_bytes, abs=1e-6), axis
    code, out, _ = cli("simulate", "gpt-moe-tiny", "--mesh", mesh, "--fsdp", "--memory",
                       "--steps", "1")
    assert code == 0 and "mismatch" not in out, out[-2000:]


def test_switch_top1_parity_on_dp2_ep2() -> None:
    ref = resolve("tests.test_moe:moe_top1")
    result, parity = simulate(Layout(ref, sl.Mesh(dp=2, ep=2)), steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    counts = result.metrics[0]["moe1.tokens_per_expert"]
    assert sum(counts) == BATCH * SEQ and result.metrics[0]["moe1.dropped"] == 0


# -- schedule --------------------------------------------------------------------------
def _moe_records(records: list[Record], layer: int) -> list[Record]:
    return [r for r in records if r.site == f"blocks.{layer}.mlp"
            or r.site.startswith(f"blocks.{layer}.mlp.")]


def test_two_all_to_alls_forward_and_two_backward_per_moe_layer() -> None:
    lay = Layout(resolve("gpt-moe-tiny"), sl.Mesh(dp=2, ep=2))
    ex = explain(lay)
    records = ex.schedules.ranks[0]
    model = lay.model.build(meta=True)
    local_tokens = BATCH // 4 * SEQ
    for layer in MOE_LAYERS:
        moe = model.blocks[layer].mlp
        a2a = [r for r in _moe_records(records, layer)
               if r.axis == "ep" and r.op.value != "all_reduce"]
        assert [(r.phase.value, r.op.value) for r in a2a] == (
            [("forward", "all_to_all")] * 2 + [("backward", "all_to_all")] * 2)
        assert {r.bytes for r in a2a} == {moe.all_to_all_payload(local_tokens)}
    dense = [r for r in records if r.op.value == "all_to_all"
             and not any(r.site.startswith(f"blocks.{i}.mlp") for i in MOE_LAYERS)]
    assert dense == []
    sim, _ = simulate(lay, steps=1)
    assert [r.signature() for r in sim.records] == [r.signature() for r in records]


def test_expert_gradients_reduce_over_dp_only() -> None:
    lay = Layout(resolve("gpt-moe-tiny"), sl.Mesh(dp=2, ep=2))
    records = explain(lay).schedules.ranks[0]
    local = {(2, 64, 256), (2, 256, 64)}  # w_up, w_down: 4 experts / ep=2 on this rank
    full = {(4, 64, 256), (4, 256, 64)}
    for layer in MOE_LAYERS:
        grads = [r for r in _moe_records(records, layer)
                 if r.phase.value == "backward" and r.op.value == "all_reduce"
                 and r.shape in local | full]
        assert sorted((r.axis, r.shape) for r in grads) == [
            ("dp", (2, 64, 256)), ("dp", (2, 256, 64))]
        # nothing at the expert parameters' own sites (no DDP all-reduce over dp x ep)
        assert not [r for r in records if r.site in (f"blocks.{layer}.mlp.w_up",
                                                     f"blocks.{layer}.mlp.w_down")]
        # the only other MoE-layer reductions: routing statistics (3X+1 floats) per token axis
        stats = [r for r in _moe_records(records, layer)
                 if r.op.value == "all_reduce" and r.shape == (13,)]
        assert sorted(r.axis for r in stats) == ["dp", "ep"]
