"""Recorded schedules against the analytic formulas and across modes."""

from __future__ import annotations

import collections
import json
import math
from dataclasses import replace

import pytest

import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.schedule import Op, Phase, totals
from models import PRESETS
from tests.conftest import layout

B, S, E = 8, 32, 64  # gpt-tiny's default batch, seq and width


def _block_counts(records, axis: str = "tp") -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for r in records:
        if r.axis == axis and r.site.startswith("blocks.") and r.site.count(".") == 1:
            out[(r.site, r.phase.value, r.op.value)].append(r.bytes)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_minimum_per_layer(tp: int) -> None:
    recs = explain(layout(tp=tp)).schedules.ranks[0]
    counts = _block_counts(recs)
    for i in range(4):  # gpt-tiny has 4 layers; q, k, v are separate linears
        for phase in ("forward", "backward"):
            sizes = counts[(f"blocks.{i}", phase, "all_reduce")]
            assert sizes == [B * S * E * 4] * 2, (i, phase, sizes)
    # nothing else inside the blocks talks over tp
    inner = [r for r in recs if r.axis == "tp" and r.site.startswith("blocks.") and r.site.count(".") > 1]
    assert inner == []


def test_dp_gradient_all_reduce_payload_is_all_parameter_bytes() -> None:
    recs = explain(layout(dp=2)).schedules.ranks[0]
    model = PRESETS["gpt-tiny"].factory()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = [r for r in recs if r.axis == "dp"]
    assert {r.op for r in grads} == {Op.ALL_REDUCE} and {r.phase for r in grads} == {Phase.BACKWARD}
    assert sum(r.bytes for r in grads) == param_bytes == 216_192 * 4
    assert sum(r.wire_bytes for r in grads) == 2 * (2 - 1) / 2 * param_bytes


@pytest.mark.parametrize(("dp", "batch"), [(4, 8), (3, 9)])
def test_fsdp_volume_is_three_times_n_minus_one_over_n_psi(dp: int, batch: int) -> None:
    ex = explain(replace(layout(fsdp=True, dp=dp), batch=batch))
    recs = ex.schedules.ranks[0]
    model = PRESETS["gpt-tiny"].factory()
    # psi: every parameter once (lm_head shares wte: gathered once for both), each padded
    # up to a multiple of dp along its sharded dim (dim 0 here: nothing else shards gpt-tiny)
    psi = 0
    for name, p in model.named_parameters():
        rows = -(-p.shape[0] // dp) * dp
        psi += rows * math.prod(p.shape[1:]) * 4
    got = sum(r.wire_bytes for r in recs if r.axis == "dp")
    assert got == pytest.approx(3 * (dp - 1) / dp * psi, rel=0, abs=1e-6)
    ops = collections.Counter((r.phase, r.op) for r in recs if r.axis == "dp")
    # a layer of the stack (blocks.i), and outside it a module's own parameters, is one
    # collective for those of its parameters that split evenly over dp (FSDP2's unit),
    # if two or more do (the tied wte/lm_head weight: alone); the rest one each
    units: dict[str, list[bool]] = collections.defaultdict(list)
    for name, p in model.named_parameters():
        unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else \
            name.rpartition(".")[0] if name != "wte.weight" else name
        units[unit].append(p.shape[0] % dp == 0)
    count = sum((1 if even.count(True) > 1 else even.count(True)) + even.count(False)
                for even in units.values())
    # dp=4: 4 layers, wte, wpe, ln_f; dp=3: nothing splits evenly, one per parameter
    assert count == (7 if dp == 4 else len(list(model.parameters())))
    assert ops == {(Phase.FORWARD, Op.ALL_GATHER): count, (Phase.BACKWARD, Op.ALL_GATHER): count,
                   (Phase.BACKWARD, Op.REDUCE_SCATTER): count}
    unpadded = sum(p.numel() * 4 for _, p in model.named_parameters())
    dp_terms = ex.analytic["dp"]
    assert dp_terms.wire_bytes == pytest.approx(got)
    padding_shown = any("padding" in t.what for t in dp_terms.terms)
    assert padding_shown == (psi != unpadded)


@pytest.mark.parametrize(("mesh", "fsdp"), [({"dp": 2, "tp": 2}, False), ({"dp": 2, "tp": 2}, True)])
def test_dry_and_simulate_record_the_same_schedule(mesh: dict[str, int], fsdp: bool) -> None:
    lay = layout(fsdp=fsdp, **mesh)
    dry = explain(lay).schedules.ranks[0]
    sim, _ = simulate(lay, steps=1)
    assert [(r.signature(), r.site) for r in dry] == [(r.signature(), r.site) for r in sim.records]
    assert len(dry) > 20


def test_fsdp_gathers_each_layer_of_the_stack_in_one_collective() -> None:
    """FSDP2's unit: one all-gather forward, one before the backward and one reduce-scatter
    per layer, its bytes all the layer's parameters (bf16: gathered at half the bytes,
    reduced in fp32); dry and simulate record it alike, and simulate matches one device."""
    model = PRESETS["gpt-tiny"].factory()
    layer = sum(p.numel() for p in model.blocks[0].parameters())
    for precision, size in (("fp32", 4), ("bf16", 2)):
        lay = Layout(resolve("gpt-tiny"), sl.Mesh(dp=2), fsdp=True, precision=precision)
        dry = explain(lay).schedules.ranks[0]
        sim, _ = simulate(lay, steps=1)
        assert [(r.signature(), r.site) for r in dry] == [(r.signature(), r.site)
                                                          for r in sim.records]
        for i in range(4):
            got = sorted((r.phase.value, r.op.value, r.bytes) for r in dry
                         if r.axis == "dp" and r.site == f"blocks.{i}")
            assert got == [("backward", "all_gather", layer * size),
                           ("backward", "reduce_scatter", layer * 4),
                           ("forward", "all_gather", layer * size)], (precision, i, got)


def test_recorded_totals_equal_the_analytic_volume() -> None:
    for lay in (layout(dp=2, tp=2), layout(fsdp=True, dp=2, tp=2), layout(tp=4),
                Layout(resolve("gpt-tiny"), sl.Mesh(dp=2, tp=2), fsdp=True, precision="bf16"),
                Layout(resolve("gpt-tiny"), sl.Mesh(sp=2, tp=2), precision="bf16")):
        ex = explain(lay)
        rec = totals(ex.schedules.ranks[0])["axis"]
        for axis, vol in ex.analytic.items():
            assert rec[axis]["wire_bytes"] == pytest.approx(vol.wire_bytes, abs=1e-6), (lay.mesh, axis)


def test_explain_json_schema(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "dp=2,tp=2", "--json", "--all-ranks")
    assert code == 0
    d = json.loads(out)
    assert d["mesh"] == {"dp": 2, "tp": 2} and d["world_size"] == 4
    assert d["model"] == {"name": "gpt-tiny", "params": 216_192}
    assert sorted(d["ranks"]) == ["0", "1", "2", "3"]
    first = d["ranks"]["0"][0]
    assert set(first) == {"index", "phase", "site", "op", "axis", "group", "shape", "dtype",
                          "bytes", "wire_bytes"}
    ops = {r["op"] for rs in d["ranks"].values() for r in rs}
    assert ops <= {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute", "send",
                   "recv", "broadcast"}
    # groups are per rank: rank 3's tp group is [2, 3] and its dp group [1, 3]
    r3 = d["ranks"]["3"]
    assert {tuple(r["group"]) for r in r3 if r["axis"] == "tp"} == {(2, 3)}
    assert {tuple(r["group"]) for r in r3 if r["axis"] == "dp"} == {(1, 3)}
    for r in d["ranks"]["0"]:
        n = len(r["group"])
        factor = 2 * (n - 1) / n if r["op"] == "all_reduce" else (n - 1) / n
        assert r["wire_bytes"] == pytest.approx(factor * r["bytes"])
        assert r["bytes"] == math.prod(r["shape"]) * 4
    assert d["totals"]["axis"]["tp"]["bytes"] == sum(r["bytes"] for r in d["ranks"]["0"]
                                                     if r["axis"] == "tp")
    assert set(d["totals"]["phase"]) == {"forward", "backward"}


def test_explain_gpt_7b_dry_at_64_ranks(cli) -> None:
    code, out, _ = cli("explain", "gpt-7b", "--mesh", "dp=8,tp=8", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["world_size"] == 64 and d["model"]["params"] == 6_747_070_464
    recs = d["ranks"]["0"]
    per_layer = collections.Counter((r["site"], r["phase"]) for r in recs
                                    if r["axis"] == "tp" and r["site"].startswith("blocks."))
    assert len(per_layer) == 64 and set(per_layer.values()) == {2}
    # b*s*h*4 with the local batch 8/8 = 1, seq 2048, width 4096
    assert {r["bytes"] for r in recs if r["axis"] == "tp" and r["site"] == "blocks.0"} == {
        1 * 2048 * 4096 * 4}


@pytest.mark.parametrize("mesh", [{"dp": 2}, {"dp": 2, "tp": 2}])
def test_gradient_buckets_are_recorded_as_the_formula_counts_them(mesh: dict[str, int]) -> None:
    """8 KiB buckets on gpt-tiny: several buckets, each one dp all-reduce carrying its
    parameters' bytes; dry and simulate record the same; the analytic volume is exact."""
    from lowering.plan import grad_buckets

    lay = layout(**mesh)
    lay = type(lay)(lay.model, lay.mesh, lay.rules, bucket_kb=8)
    ex = explain(lay)
    dry = ex.schedules.ranks[0]
    model = lay.model.build(seed=0, meta=True)
    buckets = grad_buckets(lay.plan(model), model)
    n_params = len(list(model.parameters()))
    assert 2 < len(buckets) < n_params
    dp = [r for r in dry if r.axis == "dp"]
    assert [r.site for r in dp] == [b.site for b in buckets if "dp" in b.axes]
    assert [r.bytes for r in dp] == [b.nbytes for b in buckets if "dp" in b.axes]
    if mesh == {"dp": 2}:  # every gradient in exactly one bucket, whole
        assert sorted(n for b in buckets for n in b.names) == sorted(
            n for n, _ in model.named_parameters())
        assert sum(b.nbytes for b in buckets) == 4 * sum(p.numel() for p in model.parameters())
        # a bucket closes once it reaches 8 KiB (DDP's rule): only its last gradient crosses
        last = [4 * model.get_parameter(b.names[-1]).numel() for b in buckets]
        assert all(b.nbytes - n < 8 * 1024 for b, n in zip(buckets[:-1], last))
    rec = totals(dry)["axis"]
    for axis, vol in ex.analytic.items():
        assert rec[axis]["wire_bytes"] == pytest.approx(vol.wire_bytes, abs=1e-6), axis
    sim, _ = simulate(lay, steps=1)
    assert [(r.signature(), r.site) for r in dry] == [(r.signature(), r.site) for r in sim.records]


def test_a_negative_bucket_size_is_a_sharding_error(cli) -> None:
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "dp=2", "--bucket-kb", "-1")
    assert code == 2 and "--bucket-kb -1" in err and ">= 0" in err


def test_tree_leaves_walks_as_pytree_does() -> None:
    """Dry traces flatten every op's arguments with our own walk (pytree's general one
    was a tenth of a 70B trace): the same leaves, the same objects, in the same order."""
    import torch
    import torch.utils._pytree as pytree

    from lowering._torch import tree_leaves
    pair = collections.namedtuple("pair", "a b")
    t = torch.ones(2)
    for tree in [(t, [2, {"x": t, "y": (None, "s")}]), pair(t, [3]),
                 collections.OrderedDict(a=t, b=[t, 1.5]), torch.Size([2, 3]), [],
                 torch.return_types.max((t, t)), {"k": torch.Size([1])}, t]:
        ours, theirs = tree_leaves(tree), pytree.tree_leaves(tree)
        assert len(ours) == len(theirs) and all(a is b for a, b in zip(ours, theirs)), tree
