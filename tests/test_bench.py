"""``shardlang bench``: one torchrun launch on a tiny model reports every field, beside
DDP; which layouts have no hand-written baseline, and why. (Speed itself is measured by
the benchmark, never asserted by a timed test.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowering.bench import no_baseline_reason
from tests.conftest import layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_bench_with_baseline_reports_every_field(tmp_path: Path) -> None:
    trace = tmp_path / "step.json"
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "bench", "gpt-tiny", "--mesh", "dp=2", "--baseline",
         "--steps", "3", "--warmup", "1", "--trace", str(trace), "--json", "--timeout", "300"],
        capture_output=True, text=True, timeout=350, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (e,) = json.loads(p.stdout.strip().splitlines()[-1])["layouts"]
    assert e["mesh"] == "dp=2" and e["fsdp"] is False and e["precision"] == "fp32"
    assert (e["batch"], e["seq"], e["steps"]) == (8, 32, 3)
    s = e["step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert e["tokens_per_s"] == pytest.approx(8 * 32 / s["median"])
    # a forward and backward of the global batch: 6 FLOPs per parameter per token, at least
    assert e["flops_per_step"] >= 6 * 216_192 * 8 * 32 * 0.9
    assert e["tflops"] == pytest.approx(e["flops_per_step"] / s["median"] / 1e12)
    assert e["tflops_per_rank"] == pytest.approx(e["tflops"] / 2)
    assert e["mfu"] is None  # no device peak on a CPU
    mem = e["peak_memory"]
    assert e["peak_memory_kind"] == "peak RSS (ru_maxrss)" and sorted(mem) == ["0", "1"]
    assert all(m > 50 * 2**20 for m in mem.values())
    assert set(e["axis_s"]) == {"dp"} and e["axis_s"]["dp"] > 0
    assert e["compute_s"] > 0
    parts = e["compute_s"] + sum(e["axis_s"].values()) + e["other_s"]
    assert parts == pytest.approx(e["profiled_step_s"], rel=0.10)
    assert e["bubble"] is None
    b = e["baseline"]
    assert b["name"] == "DistributedDataParallel"
    assert b["ratio"] == pytest.approx(s["median"] / b["step_s"]["median"])
    # the same model on the same batches: the baseline's losses are shardlang's
    ours, theirs = e["losses"]["shardlang"], e["losses"]["baseline"]
    assert len(ours) == len(theirs) == 4
    assert ours == pytest.approx(theirs, rel=1e-5)
    events = json.loads(trace.read_text())["traceEvents"]
    assert {ev.get("pid") for ev in events} == {0, 1}
    names = {ev.get("name") for ev in events}
    assert "dp all_reduce" in names and "aten::mm" in names


@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_a_hugging_face_model_on_dp_and_tp_beside_ddp_and_parallelize_module() -> None:
    """A model we did not write: HF Llama (tiny) on dp=2 x tp=2. The TP plan is read off
    shardlang's, the linears return DTensors that meet the model's own rotary tables
    (plain tensors) as replicated ones, DDP runs over the dp sub-mesh; losses agree."""
    config = ("num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
              "num_key_value_heads=2,vocab_size=128")
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "bench", "hf:llama-3-8b", "--config", config,
         "--mesh", "dp=2,tp=2", "--baseline", "--steps", "2", "--warmup", "1", "--json",
         "--timeout", "300"],
        capture_output=True, text=True, timeout=350, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (e,) = json.loads(p.stdout.strip().splitlines()[-1])["layouts"]
    assert e["baseline"]["name"] == "DistributedDataParallel + parallelize_module TP"
    assert e["losses"]["shardlang"] == pytest.approx(e["losses"]["baseline"], rel=1e-5)
    assert set(e["axis_s"]) == {"dp", "tp"} and min(e["axis_s"].values()) > 0
    assert sorted(e["peak_memory"]) == ["0", "1", "2", "3"] and e["tflops"] > 0


def test_layouts_without_a_hand_written_baseline_say_why() -> None:
    for mesh, word in (({"pp": 2}, "pp"), ({"dp": 2, "sp": 2}, "sp"), ({"ep": 2}, "ep")):
        lay = layout("gpt-moe-tiny" if "ep" in mesh else "gpt-tiny", **mesh)
        assert word in no_baseline_reason(lay.plan(lay.model.build(seed=0, meta=True)))
    lay = layout("gpt-tiny", dp=2, tp=2)  # tied embeddings: DDP + TP would untie them
    model = lay.model.build(seed=0, meta=True)
    why = no_baseline_reason(lay.plan(model), model)
    assert "tied" in why and "--fsdp" in why
    fsdp = layout("gpt-tiny", fsdp=True, dp=2, tp=2)
    assert no_baseline_reason(fsdp.plan(model), model) is None
    assert no_baseline_reason(layout("gpt-bench", dp=2, tp=2).plan(
        layout("gpt-bench").model.build(seed=0, meta=True))) is None


def test_scaling_points_speedup_and_efficiency(monkeypatch) -> None:
    """--scale dp=1,2,4: strong points keep the global batch, weak ones the rows per
    rank; speed-up and efficiency against the smallest point (launches stubbed: the
    numbers are made up, the arithmetic is what is checked)."""
    import subprocess as sp

    from lowering.bench import scale

    launched: list[list[str]] = []

    def fake_run(cmd, **kw):  # noqa: ANN001, ANN003
        args = cmd[3:]
        launched.append(args)
        mesh, batch = args[args.index("--mesh") + 1], int(args[args.index("--batch") + 1])
        n = int(mesh.split("=")[1]) if "=" in mesh else 1
        step = 0.1 * batch / n * (1 + 0.1 * (n - 1))  # 10% lost per extra rank
        entry = {"mesh": mesh, "batch": batch, "tokens_per_s": batch * 32 / step,
                 "step_s": {"median": step}, "axis_s": {"dp": 0.01 * (n - 1)},
                 "profiled_step_s": step, "peak_memory": {"0": 1}}
        return sp.CompletedProcess(cmd, 0, json.dumps({"layouts": [entry]}), "")

    monkeypatch.setattr(scale.subprocess, "run", fake_run)
    argv = ["bench", "gpt-tiny", "--mesh", "dp=2", "--scale", "dp=1,2,4", "--steps", "3"]
    out = scale.run_scaling(layout("gpt-tiny", dp=2), argv, "dp=1,2,4", timeout=10, console=None)
    strong = [e for e in out if e["kind"] == "strong"]
    weak = [e for e in out if e["kind"] == "weak"]
    assert [(e["size"], e["batch"]) for e in strong] == [(1, 8), (2, 8), (4, 8)]
    assert [(e["size"], e["batch"]) for e in weak] == [(1, 8), (2, 16), (4, 32)]
    assert len(launched) == 5  # the (1, 8) point is shared
    assert all("--json" in a and "--scale" not in a and a.count("--mesh") == 1 for a in launched)
    assert launched[0][launched[0].index("--steps") + 1] == "3"
    assert [round(e["speedup"], 4) for e in strong] == [1.0, round(2 / 1.1, 4), round(4 / 1.3, 4)]
    assert [round(e["efficiency"], 4) for e in weak] == [1.0, round(1 / 1.1, 4), round(1 / 1.3, 4)]
    assert strong[2]["comm_share"] == pytest.approx(0.03 / strong[2]["profiled_step_s"])


@pytest.mark.parametrize("bad", ["dp=2", "xp=1,2", "dp=4,2", "dp=1,two"])
def test_a_bad_scale_is_a_sharding_error(bad: str) -> None:
    import shardlang as sl
    from lowering.bench.scale import parse_scale

    with pytest.raises(sl.ShardingError, match="--scale"):
        parse_scale(bad)


def test_flops_of_a_hugging_face_model_on_meta_tensors() -> None:
    """HF's mask code asks data-dependent questions of meta tensors (answered as in dry
    mode); a forward and backward is at least 6 FLOPs per parameter per token."""
    from lowering.bench.measure import model_flops
    from lowering.run.registry import resolve

    ref = resolve("hf:llama-3-8b", config="num_hidden_layers=2,hidden_size=64,"
                  "intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,"
                  "vocab_size=128")
    n = sum(p.numel() for p in ref.build(meta=True).parameters())
    flops = model_flops(lambda: ref.build(meta=True), 8, 32, 0)
    assert 6 * n * 8 * 32 * 0.9 <= flops <= 6 * n * 8 * 32 * 3



def test_predict_sets_the_prediction_beside_the_measured_step(monkeypatch) -> None:
    """bench --predict: explain --device's prediction of the same layout beside one
    --json launch (stubbed: a made-up measured step), and the relative error."""
    import subprocess as sp

    from lowering.bench import scale, validate
    from lowering.plan import device
    from lowering.run import explain

    launched: list[list[str]] = []

    def fake_run(cmd, **kw):  # noqa: ANN001, ANN003
        launched.append(cmd[3:])
        entry = {"mesh": "tp=2", "fsdp": False, "step_s": {"median": 0.5}, "axis_s": {},
                 "compute_s": 0.4}
        return sp.CompletedProcess(cmd, 0, json.dumps({"layouts": [entry]}), "")

    monkeypatch.setattr(scale.subprocess, "run", fake_run)
    lay = layout("gpt-tiny", tp=2)
    argv = ["bench", "gpt-tiny", "--mesh", "tp=2", "--predict", "--steps", "3"]
    e = validate.run_predicted(lay, argv, "h100-80gb", timeout=10)
    want = explain(lay).predict(device("h100-80gb")).step_s
    assert e["predicted"]["step_s"] == pytest.approx(want)
    assert e["error"] == pytest.approx((want - 0.5) / 0.5)
    assert launched == [["bench", "gpt-tiny", "--mesh", "tp=2", "--steps", "3", "--json"]]
