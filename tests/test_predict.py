"""Predicted step time and ``shardlang plan``: the dry trace's compute equals torch's own
FLOP counter on the plain model, the time model's terms equal hand-computed formulas,
a pipeline's predicted bubble is the schedule's, and ``plan`` ranks layouts the way
``explain --device`` predicts them."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

import shardlang as sl

from lowering.cli import main
from lowering.plan import (Pipe, Schedule, bubble_of, bubble_theory, collective_seconds, device,
                           predict, timeline)
from lowering.plan.search import Candidate, candidates, estimate
from lowering.plan.time import compute_seconds, predict_items
from lowering.run import Layout, explain, resolve, simulate
from lowering.schedule import Cost, Op, Phase, Record
from lowering.search import profile, search

pytestmark = pytest.mark.timeout(300)


def _torch_flops(layout: Layout) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step of the plain model, counted by torch."""
    model = layout.model.build(seed=0)
    batch, seq = layout.shapes(model)
    idx, tgt = torch.randint(0, 64, (2, batch, seq))
    with FlopCounterMode(display=False) as fc:
        out = model(idx)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(out.transpose(1, 2), tgt)
        fwd = fc.get_total_flops()
        loss.backward()
    return fwd, fc.get_total_flops() - fwd


def test_traced_flops_equal_torch_flop_counter_and_split_over_tp() -> None:
    one = Layout.of("mlp", "dp=1")
    fwd, bwd = _torch_flops(one)
    c = explain(one).compute[0]
    assert (c[("F", 0)].flops, c[("B", 0)].flops) == (fwd, bwd)
    # tp=2 splits every matmul of the MLP: each rank does half; dp=2 half the rows
    for mesh in ("tp=2", "dp=2"):
        c2 = explain(Layout.of("mlp", mesh)).compute[0]
        assert (c2[("F", 0)].flops, c2[("B", 0)].flops) == (fwd / 2, bwd / 2), mesh
    assert c[("O", 0)].bytes > 0 and c[("O", 0)].flops == 0  # AdamW: memory-bound


def test_collective_and_compute_terms_are_the_formulas() -> None:
    dev, mesh = device("h100-80gb"), Layout.of("mlp", "dp=2,tp=4").mesh
    S = 64 * 2**20
    tp = Record(0, Phase.FORWARD, "x", Op.ALL_REDUCE, "tp", (S // 4,), "float32", S, 4)
    # tp's 4 ranks are consecutive: NVLink; ring all-reduce 2(n-1) steps, 2(n-1)/n S bytes
    assert collective_seconds(tp, mesh, dev) == pytest.approx(
        6 * dev.intra_node_latency + 1.5 * S / dev.intra_node_bw)
    dp = Record(0, Phase.BACKWARD, "grads 0", Op.ALL_REDUCE, "dp", (S // 4,), "float32", S, 2)
    # with 2 GPUs per node, the dp pair (ranks 0 and 4) spans nodes: the network
    assert collective_seconds(dp, mesh, dev, gpus_per_node=2) == pytest.approx(
        2 * dev.inter_node_latency + S / dev.inter_node_bw)
    f = Cost(flops=1e12, bytes=1e9)
    b = Cost(flops=2e12, bytes=2e9)
    p = predict(mesh, dev, precision="bf16", compute={0: {("F", 0): f, ("B", 0): b}},
                records={0: [tp, dp]}, pipe=None, tokens=1000)
    comp = 3e12 / (989e12 * 0.7) + 3e9 / (3.35e12 * 0.8)
    # tp on the critical path; the one gradient bucket is the last one: exposed
    assert p.step_s == pytest.approx(comp + collective_seconds(tp, mesh, dev)
                                     + collective_seconds(dp, mesh, dev))
    assert p.tflops_per_gpu == pytest.approx(3.0 / p.step_s)
    assert p.mfu == pytest.approx(p.tflops_per_gpu * 1e12 / 989e12)
    assert p.tokens_per_s == pytest.approx(1000 / p.step_s)


def _rms_norm_then_matmul(x: torch.Tensor, w: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    h = x.float()  # HF's RMSNorm, eagerly: upcast, square, mean, rsqrt, scale, downcast
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
    return y.view(-1, y.shape[-1]) @ proj


def test_fused_bytes_read_a_chains_inputs_once_and_write_what_leaves_it() -> None:
    """An eager RMSNorm moves ~10 activations of bytes; fused (one kernel between two
    matmuls) it reads x and w once and writes y once, for the matmul: exactly that. The
    GPU profiles time the fused bytes, the cpu profile (eager shardlang) every op's."""
    from lowering.schedule.recorder import Recorder

    x = torch.empty(4, 64, 256, dtype=torch.bfloat16, device="meta")
    w = torch.empty(256, dtype=torch.bfloat16, device="meta")
    proj = torch.empty(256, 512, dtype=torch.bfloat16, device="meta")
    rec = Recorder({})
    rec.count_compute = True
    with rec.recording():
        out = _rms_norm_then_matmul(x, w, proj)
        c = rec.compute_total()
    act = 4 * 64 * 256 * 2
    assert c.flops == 2 * 256 * 256 * 512 and out.shape == (256, 512)
    assert c.memory_bytes(fused=True) == act + 512 + act  # read x, read w, write y
    assert c.bytes > 8 * act  # eager: every op reads and writes its whole tensors
    with rec.recording():  # a pending tensor alive at a boundary is in memory: written
        y = x.float() * 2
        c2 = rec.compute_total() - c
    assert c2.memory_bytes(fused=True) == act + y.numel() * 4
    g, cpu = device("h100-80gb"), device("cpu")
    assert g.fuses and not cpu.fuses
    assert compute_seconds(c, g, "bf16") - compute_seconds(Cost(c.flops), g, "bf16") == \
        pytest.approx(c.memory_bytes(True) / (g.hbm_bw * g.hbm_efficiency))
    assert compute_seconds(c, cpu, "bf16") - compute_seconds(Cost(c.flops), cpu, "bf16") == \
        pytest.approx(c.bytes / cpu.hbm_bw)


def test_a_traced_model_moves_fewer_bytes_fused_than_eager() -> None:
    ex = explain(Layout.of("gpt-tiny", "dp=2,tp=2", precision="bf16"))
    for cost in ex.compute[0].values():
        assert 0 < cost.memory_bytes(fused=True) <= cost.bytes
    f = ex.compute[0][("F", 0)]
    assert f.memory_bytes(fused=True) < 0.7 * f.bytes  # its chains: gelu, residuals, casts


def test_hidden_gradient_buckets_cost_only_the_last() -> None:
    dev, mesh = device("a100-80gb"), Layout.of("mlp", "dp=8").mesh
    small = Record(0, Phase.BACKWARD, "grads 0", Op.ALL_REDUCE, "dp", (1,), "float32", 2**20, 8)
    b = Cost(flops=1e15)  # a long backward hides every bucket but the last
    p = predict(mesh, dev, precision="bf16", compute={0: {("F", 0): Cost(), ("B", 0): b}},
                records={0: [small] * 10}, pipe=None, tokens=1)
    one = collective_seconds(small, mesh, dev)
    assert p.exposed_s["dp"] == pytest.approx(one)
    assert p.axis_s["dp"] == pytest.approx(10 * one)


def test_a_run_of_equal_collectives_counts_as_its_members() -> None:
    """plan's estimates give a run of equal collectives as one item with a count: the
    prediction is the one for the members listed one by one (exposed first gather, last
    gradient sync, the rest hidden behind compute up to the window)."""
    compute = {0: {("F", 0): Cost(flops=1e12), ("B", 0): Cost(flops=2e12)}}
    runs = [("gather", Phase.FORWARD, "dp", 2e-3, 40), ("grad", Phase.BACKWARD, "dp", 3e-3, 30),
            ("critical", Phase.FORWARD, "tp", 1e-3, 7), ("after", Phase.BACKWARD, "pp", 1e-4, 3)]
    one_by_one = [(k, ph, ax, t, 1) for k, ph, ax, t, n in runs for _ in range(n)]
    h100 = device("h100-80gb")
    a, b = (predict_items(h100, precision="bf16", compute=compute, items={0: items},
                          pipe=None, tokens=1) for items in (runs, one_by_one))
    assert a.step_s == pytest.approx(b.step_s, rel=1e-12)
    assert a.exposed_s == pytest.approx(b.exposed_s, rel=1e-12)
    assert a.axis_s == pytest.approx(b.axis_s, rel=1e-12) and a.exposed_s["dp"] > 0


@pytest.mark.parametrize("schedule,m,v", [("1f1b", 8, 1), ("gpipe", 4, 1),
                                          ("interleaved", 8, 2)])
def test_pipeline_bubble_is_the_schedules(schedule: str, m: int, v: int) -> None:
    pipe = Pipe(Schedule.parse(schedule), 4, m, v)
    compute = {r: {(k, c): Cost(flops=1e12 * (2 if k == "B" else 1))
                   for c in pipe.chunks_of(r) for k in "FB"} for r in range(4)}
    p = predict_items(device("h100-80gb"), precision="bf16", compute=compute, items={},
                      pipe=pipe, tokens=1)
    # the schedule's own action order, walked with these costs: the unit-time walk's bubble
    # (torch's interleaved order idles a little more than (p-1)/(m+p-1)/v)
    unit = bubble_of(timeline(pipe, backward_cost=2.0), 4)
    assert p.bubble == pytest.approx(unit, rel=1e-6)
    if v == 1:
        assert p.bubble == pytest.approx(bubble_theory(pipe), rel=1e-6)
    busy = m * v * 3e12 / (989e12 * 0.7)  # every stage's compute, then the idle share
    assert p.step_s == pytest.approx(busy / (1 - p.bubble), rel=1e-6)


def test_a_pipelines_gradient_syncs_hide_behind_the_backwards_after_each_chunks_last() -> None:
    """Interleaved (v=2): the deeper chunk's gradients go on the wire once its last
    backward is through and hide behind the stage's later backwards of chunk 0; only
    chunk 0's share, less what its own last backward covers, shows. One chunk per rank
    (1F1B): the sync hides behind the last backward only."""
    h100 = device("h100-80gb")
    b = Cost(flops=2e12)
    t_b = compute_seconds(b, h100, "bf16")  # one microbatch's backward of one chunk
    for v, sync in ((2, 3 * t_b), (1, 3 * t_b)):
        pipe = Pipe(Schedule.INTERLEAVED if v > 1 else Schedule.ONE_F_ONE_B, 2, 4, v)
        compute = {r: {(k, c): (b if k == "B" else Cost(flops=1e12))
                       for c in pipe.chunks_of(r) for k in "FB"} for r in range(2)}
        items = {r: [("grad", Phase.BACKWARD, "dp", sync / 10, 10)] for r in range(2)}
        p = predict_items(h100, precision="bf16", compute=compute, items=items, pipe=pipe,
                          tokens=1)
        last = sync / 10
        if v == 1:  # the whole sync during the last backward, the last bucket after it
            assert p.exposed_s["dp"] == pytest.approx(max(sync - t_b, last), rel=1e-9)
        else:  # half (chunk 0's) after chunk 0's last backward began; chunk 1's hidden
            assert p.exposed_s["dp"] == pytest.approx(sync / 2 - t_b, rel=1e-9)


def test_explain_json_predicted_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "gpt-tiny", "--mesh", "pp=2,tp=2", "--device", "h100-80gb",
                 "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predicted"]
    for k in ("step_s", "tokens_per_s", "tflops_per_gpu", "mfu", "axis_s", "bubble"):
        assert k in pred, k
    assert set(pred["axis_s"]) == {"pp", "tp"} and pred["step_s"] > 0
    assert 0 < pred["bubble"] < 1 and 0 < pred["mfu"] < 1


def test_plan_traces_side_by_side_as_it_would_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan traces its finalists in forked workers, one per core; each answer is the one
    a trace in this process gives (the same prediction and memory), best first."""
    found_by = importlib.import_module("lowering.search.search")  # the module, not the function
    base = Layout.of("gpt-tiny", "dp=1", batch=8)
    dev = device("cpu")
    monkeypatch.setattr(found_by, "_workers", lambda n: min(n, 2))
    forked = search(base, 4, dev, top=2, budget_s=0)
    assert forked.traced >= 2 and len(forked.found) == 2
    assert not found_by._JOB  # the workers and their job are gone
    job = found_by._Job(base, ["none", "full"], dev, dev.gpus_per_node)
    for f in forked.found:
        traced, tried = job.trace(dataclasses.replace(f.candidate, recompute="none"))
        here = tried[-1]
        assert traced and here is not None
        assert (here.candidate, here.predicted, here.memory, here.memory_rank) == \
            (f.candidate, f.predicted, f.memory, f.memory_rank)
    assert forked.found[0].predicted.step_s <= forked.found[1].predicted.step_s

def test_plan_ranks_layouts_as_explain_predicts(capsys: pytest.CaptureFixture[str]) -> None:
    base = Layout.of("gpt-tiny", "dp=1", batch=8)
    dev = device("cpu")
    found = search(base, 4, dev, top=3, budget_s=10)
    assert len(found.found) == 3
    steps = [f.predicted.step_s for f in found.found]
    assert steps == sorted(steps)
    for f in found.found:  # each row is what explain --device predicts for it
        lay = Layout.of("gpt-tiny", f.candidate.mesh, f.candidate.rules, batch=8,
                        **f.candidate.options())
        assert explain(lay).predict(dev).step_s == pytest.approx(f.predicted.step_s)
    # the pick is at least as fast as a common hand-chosen layout
    assert steps[0] <= explain(Layout.of("gpt-tiny", "dp=4", batch=8)).predict(dev).step_s
    assert main(["plan", "gpt-tiny", "--world", "4", "--device", "cpu", "--global-batch",
                 "8", "--top", "2", "--budget", "0", "--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert len(cands) == 2
    for k in ("mesh", "fsdp", "microbatches", "schedule", "recompute", "memory",
              "predicted", "why"):
        assert k in cands[0], k


def test_plan_searches_every_chunk_count_up_to_one_layer_a_chunk() -> None:
    """Interleaved candidates: v = 2, 4, 8, 16 while every chunk holds a layer, and the
    Llama 3 paper's pp * v = layers + 2 (the embedding and the head each a chunk)."""
    from lowering.plan.search import _virtuals
    assert _virtuals(16, 126) == [2, 4, 8]  # 16 * 8 = 128 = 126 + 2: already there
    assert _virtuals(4, 30) == [2, 4, 8]    # 32 = 30 + 2
    assert _virtuals(2, 4) == [2, 3]        # 6 chunks: 4 layers, the embedding, the head
    assert _virtuals(4, 6) == [2]
    assert _virtuals(8, 6) == []
    prof = profile(Layout.of("gpt-tiny", "dp=1", batch=8))  # 4 layers
    got = {(c.mesh.pp, c.virtual) for c in candidates(2, prof, gpus_per_node=2)[0]
           if c.schedule == "interleaved"}
    assert got == {(2, 2), (2, 3)}
    assert explain(Layout.of("gpt-tiny", "pp=2", batch=8, microbatches=2,
                             schedule="interleaved", virtual=3)).predict(device("cpu")).step_s > 0


def test_plan_tries_sequence_parallel_norms_where_tp_splits_the_layers() -> None:
    """Each layout with tp > 1 is also tried with tp added to norm_seq (Megatron's
    sequence parallelism): the boundary sent between pipeline stages shrinks tp-fold in
    the estimate, and the traced layout holds fewer activation bytes."""
    from lowering.search.search import seq_tp_rule
    assert seq_tp_rule(sl.Rules.default()) == "norm_seq=sp+tp"
    assert seq_tp_rule(sl.Rules.parse("norm_seq=sp+tp", base=sl.Rules.default())) == ""
    assert seq_tp_rule(sl.Rules.parse("norm_seq=none", base=sl.Rules.default())) == ""
    base = Layout.of("gpt-tiny", "dp=1", batch=8)
    prof = profile(base)
    cands = candidates(4, prof, gpus_per_node=4, seq_tp="norm_seq=sp+tp")[0]
    with_tp = [c for c in cands if c.mesh.tp > 1]
    assert with_tp and {c.rules for c in with_tp} == {"", "norm_seq=sp+tp"}
    assert all(c.rules == "" for c in cands if c.mesh.tp == 1)
    pipe = [c for c in with_tp if c.mesh.pp > 1 and c.rules]
    plain = dataclasses.replace(pipe[0], rules="")
    dev = device("h100-80gb")
    sp_pred, _ = estimate(pipe[0], prof, dev, precision="fp32")
    plain_pred, _ = estimate(plain, prof, dev, precision="fp32")
    assert sp_pred.axis_s["pp"] < plain_pred.axis_s["pp"]
    acts = {r: explain(Layout.of("gpt-tiny", "tp=2", r, batch=8)).memory[0].activations
            for r in ("", "norm_seq=sp+tp")}
    assert acts["norm_seq=sp+tp"] < acts[""]
    assert "rules norm_seq=sp+tp" in pipe[0].label()


def test_plan_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt-tiny", "--world", "4", "--device", "tpu-v9"]) == 2
    err = capsys.readouterr().err
    assert "unknown device" in err and "h100-80gb" in err and "cpu" in err
    # 7 ranks: 7 divides neither the batch of 8, nor seq 32, nor 4 heads, nor 2 layers
    assert main(["plan", "gpt-tiny", "--world", "7", "--device", "cpu", "--global-batch",
                 "8"]) == 2
    err = capsys.readouterr().err
    assert "no valid layout of 7 ranks" in err and "World sizes near 7 that work: 4, 8" in err
    assert main(["plan", "gpt-7b", "--world", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no layout of 1 rank fits cpu" in err and "smallest estimate needs" in err


# -- activation recompute ---------------------------------------------------------------
def _llama(layers: int, mesh: str, **options: object) -> Layout:
    config = (f"num_hidden_layers={layers},hidden_size=64,intermediate_size=128,"
              "num_attention_heads=4,num_key_value_heads=2,vocab_size=128")
    return Layout(resolve("hf:llama-3-8b", config=config), sl.Mesh.parse(mesh),
                  sl.Rules.default(), batch=8, seq=32, **options)  # type: ignore[arg-type]


def test_full_recompute_runs_the_stack_forward_again_as_torch_checkpoint_does() -> None:
    """torch's own checkpoint of every layer (recomputing the whole forward: early stop
    off) adds the layers' forward FLOPs to the backward (FlopCounterMode, which counts no
    FLOPs for the CPU's fused attention kernel); the prediction adds the same, and only to
    the executed FLOPs."""
    lay = _llama(2, "dp=1", recompute="full")
    model = lay.model.build(seed=0)
    stack = model.model.layers
    plain = _torch_flops(Layout(lay.model, lay.mesh, lay.rules, batch=8, seq=32))
    originals = [layer.forward for layer in stack]
    for layer, fwd in zip(stack, originals):
        layer.forward = functools.partial(checkpoint, fwd, use_reentrant=False)
    idx, tgt = torch.randint(0, 128, (2, 8, 32))
    with FlopCounterMode(display=False) as fc, set_checkpoint_early_stop(False):
        out = model(idx)
        F.cross_entropy(out.transpose(1, 2), tgt).backward()
        again = fc.get_total_flops() - sum(plain)
    assert again > 0
    ex = explain(lay)
    stack = ex.stack[0][0].forward
    assert stack.flops - stack.attention_flops == again
    again = stack.flops - stack.skipped_flops  # a causal kernel runs half its pairs
    p = ex.predict(device("h100-80gb"))
    none = explain(_llama(2, "dp=1")).predict(device("h100-80gb"))
    executed, model_flops = (p.hardware_tflops_per_gpu * p.step_s * 1e12,
                             p.tflops_per_gpu * p.step_s * 1e12)
    assert executed - model_flops == pytest.approx(again, rel=1e-6)
    assert model_flops == pytest.approx(none.tflops_per_gpu * none.step_s * 1e12, rel=1e-6)
    assert p.step_s > none.step_s


def test_full_recompute_holds_each_layers_input_and_repeats_tp_collectives() -> None:
    """One layer more costs, under full recompute, exactly its input (8 x 32 x 64 fp32:
    64 KiB, replicated over tp), against everything it saves without; the tp all-reduces
    of the forward run again in the backward."""
    acts = {(layers, mode): explain(_llama(layers, "tp=2", recompute=mode)).memory[0].activations
            for layers in (2, 3) for mode in ("none", "full")}
    assert acts[(3, "full")] - acts[(2, "full")] == 8 * 32 * 64 * 4
    assert acts[(3, "none")] - acts[(2, "none")] > 4 * 8 * 32 * 64 * 4
    assert acts[(2, "full")] < acts[(2, "none")]
    dev = device("h100-80gb")
    ex = explain(_llama(2, "tp=2"))
    fwd_tp = sum(collective_seconds(r, ex.plan.mesh, dev) for r in ex.stage_records[0]
                 if r.axis == "tp" and r.phase is Phase.FORWARD and ".layers." in r.site)
    none = ex.predict(dev)
    full = explain(_llama(2, "tp=2", recompute="full")).predict(dev)
    assert fwd_tp > 0 and full.axis_s["tp"] == pytest.approx(none.axis_s["tp"] + fwd_tp)
    # selective recompute equals none with fused attention (module docstring)
    sel = explain(_llama(2, "tp=2", recompute="selective"))
    assert sel.memory[0].activations == acts[(2, "none")]
    assert sel.predict(dev).step_s == pytest.approx(none.step_s)


def test_plan_recomputes_where_a_layout_does_not_fit_and_modes_refuse_it() -> None:
    base = _llama(2, "dp=1")
    prof = profile(base)
    none, full = (estimate(Candidate(sl.Mesh(dp=2), recompute=r), prof, device("cpu"),
                           precision="fp32") for r in ("none", "full"))
    assert full[1] < none[1] and full[0].step_s > none[0].step_s
    # a device between the smallest traced peaks of 2-rank layouts without and with
    # recompute: auto picks full recompute, none finds nothing
    least = {}
    for r in ("none", "full"):
        least[r] = min(max(m.peak for m in explain(Layout(
            base.model, c.mesh, base.rules, batch=8, seq=32,
            **dataclasses.replace(c, recompute=r).options())).memory.values())
            for c in candidates(2, prof, gpus_per_node=2)[0])
    assert least["full"] < least["none"]
    small = dataclasses.replace(device("cpu"), memory=(least["full"] + least["none"]) / 2)
    got = search(base, 2, small, top=1, budget_s=0)
    assert got.found[0].candidate.recompute == "full"
    with pytest.raises(sl.ShardingError, match="no layout of 2 ranks fits"):
        search(base, 2, small, top=1, budget_s=0, recompute="none")
    with pytest.raises(sl.ShardingError, match="predicts activation recompute"):
        simulate(_llama(2, "dp=2", recompute="full"))
    with pytest.raises(sl.ShardingError, match="recompute"):
        Layout.of("gpt-tiny", "dp=2", recompute="fully")


@pytest.mark.parametrize(("mesh", "kw"), [("dp=2,tp=2", {}),
                                          ("pp=2,dp=2", {"microbatches": 4, "schedule": "1f1b"})])
def test_a_trace_under_another_recompute_mode_equals_its_own_trace(mesh: str, kw: dict) -> None:
    """plan re-reads a traced layout that does not fit under full recompute instead of
    tracing it again: memory and prediction must equal a trace made with recompute."""
    h100 = device("h100-80gb")
    traced = explain(Layout.of("gpt-tiny", mesh, recompute="full", **kw))
    again = explain(Layout.of("gpt-tiny", mesh, **kw))
    reread = again.with_recompute("full")
    assert reread.memory == traced.memory and reread.predict(h100) == traced.predict(h100)
    assert reread.memory[0].activations < again.memory[0].activations
    assert again.with_recompute("none").memory == again.memory


def test_exposed_gradient_time_never_exceeds_the_collectives() -> None:
    """Gradient syncs recorded in both phases (a pipeline's forward-phase reductions) share
    the exposed tail by their count; each phase's share is not the whole tail again."""
    from lowering.plan import device
    from lowering.plan.time import _stage
    from lowering.schedule import Phase

    items = [("grad", Phase.BACKWARD, "dp", 1.0, 1), ("grad", Phase.FORWARD, "dp", 1.0, 1)]
    st = _stage({}, items, [0], 1, device("h100-80gb"), "bf16", False)
    assert st.axis["dp"] == 2.0
    assert 0 < st.exposed["dp"] <= st.axis["dp"]
