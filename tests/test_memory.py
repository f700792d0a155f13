"""Memory per rank: explain's prediction (a dry trace on meta tensors) equals what simulate
mode counts on real tensors, category by category; and both equal counts made here, by
hand, on a plain single-device model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lowering.debug import memory_mismatches, predict_and_measure
from lowering.debug.memory import MEMORY_RTOL
from lowering.plan import ADAM_STEP_BYTES, CATEGORIES, Memory, Pipe, Schedule, in_flight_peak
from lowering.run import Layout, explain

pytestmark = pytest.mark.timeout(300)


def _saved_bytes(layout: Layout, rows: int) -> int:
    """What autograd saves for one forward and loss of the plain model on ``rows`` rows,
    counted here with our own hooks: one count per storage, parameters left out."""
    model = layout.model.build(seed=0)
    _, seq = layout.shapes(model)
    idx, tgt = torch.randint(0, 64, (2, rows, seq))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in params:
            held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)
        logits = logits[0] if isinstance(logits, tuple) else logits
        F.cross_entropy(logits.transpose(1, 2), tgt, reduction="sum")
    return sum(held.values())


def test_prediction_equals_a_count_by_hand_on_one_device_and_on_dp2() -> None:
    one = Layout.of("gpt-tiny", "dp=1")
    model = one.model.build(seed=0)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    batch, _ = one.shapes(model)
    m = explain(one).memory[0]
    assert m == Memory(params=n_bytes, grads=n_bytes,
                       optimizer=2 * n_bytes + ADAM_STEP_BYTES * n_tensors,
                       activations=_saved_bytes(one, batch), buffers=0)
    # dp=2: every parameter whole on each rank, half the rows' activations, and one more
    # logits-sized block: a view of the logits plain torch shares, DTensor copies locally
    dp = explain(Layout.of("gpt-tiny", "dp=2"), ranks=[0, 1]).memory
    _, seq = one.shapes(model)
    logits = batch // 2 * seq * one.model.vocab_size(model) * 4
    assert dp[0] == dp[1] and dp[0].params == n_bytes
    assert dp[0].activations == _saved_bytes(one, batch // 2) + logits
    # FSDP keeps a 1/dp shard of each parameter, its gradient and its AdamW state
    fsdp = explain(Layout.of("gpt-tiny", "dp=2", fsdp=True)).memory[0]
    assert fsdp.params < 0.55 * n_bytes and fsdp.grads == fsdp.params
    assert fsdp.buffers > 0  # the gathered parameters in use at once


LAYOUTS = [
    pytest.param("gpt-tiny", "dp=2,tp=2", {}, id="dense-dp2xtp2"),
    pytest.param("gpt-tiny", "dp=2", {"fsdp": True}, id="fsdp-dp2"),
    pytest.param("gpt-moe-tiny", "ep=2,tp=2", {}, id="moe-ep2xtp2"),
    pytest.param("gpt-tiny", "sp=2", {}, id="ring-sp2"),
    pytest.param("gpt-tiny", "pp=2,dp=2", {}, id="pipeline-1f1b-pp2xdp2"),
    pytest.param("gpt-tiny", "pp=2", {"schedule": "gpipe", "microbatches": 4},
                 id="pipeline-gpipe-4mb"),
]


@pytest.mark.parametrize("model,mesh,options", LAYOUTS)
def test_predicted_equals_measured_for_every_category(model: str, mesh: str,
                                                      options: dict) -> None:
    lay = Layout.of(model, mesh, **options)
    predicted, measured = predict_and_measure(lay)
    assert sorted(predicted) == sorted(measured) == list(range(lay.mesh.size))
    rtol = MEMORY_RTOL if lay.mesh.pp > 1 or lay.options.precision.value != "fp32" else 0.0
    assert memory_mismatches(predicted, measured, rtol=rtol) == []
    for m in measured.values():
        assert m.params > 0 and m.grads == m.params and m.activations > 0
        assert m.optimizer > 2 * m.params  # exp_avg, exp_avg_sq and the step counters
    if "ep" in mesh:  # the dispatch all-to-all's send and receive buffers
        assert all(m.buffers > 0 for m in measured.values())


def test_gpipe_holds_every_microbatch_and_1f1b_only_those_in_flight() -> None:
    # the walk itself, on numbers: one microbatch's forward saves 100 B on either rank
    gpipe = Pipe(pp=2, microbatches=4, schedule=Schedule.GPIPE)
    onef = Pipe(pp=2, microbatches=4, schedule=Schedule.ONE_F_ONE_B)
    assert [in_flight_peak(gpipe, r, {r: 100}) for r in (0, 1)] == [400, 400]
    assert [in_flight_peak(onef, r, {r: 100}) for r in (0, 1)] == [200, 100]
    # and on a traced model: GPipe's first stage holds about twice 1F1B's (4 vs 2 in flight)
    act = {s: explain(Layout.of("gpt-tiny", "pp=2", schedule=s, microbatches=4)).memory[0]
           .activations for s in ("gpipe", "1f1b")}
    assert act["gpipe"] == pytest.approx(2 * act["1f1b"], rel=0.01)


def test_bf16_keeps_fp32_masters_and_saves_less_activation_memory() -> None:
    fp32 = explain(Layout.of("gpt-tiny", "dp=2")).memory[0]
    bf16 = explain(Layout.of("gpt-tiny", "dp=2", precision="bf16")).memory[0]
    assert (bf16.params, bf16.grads, bf16.optimizer) == (fp32.params, fp32.grads, fp32.optimizer)
    # about 0.71: the loss runs in fp32 (its log-probabilities and the logits cast up stay fp32)
    assert bf16.activations < 0.75 * fp32.activations
    predicted, measured = predict_and_measure(Layout.of("gpt-tiny", "dp=2", fsdp=True,
                                                        precision="bf16"))
    assert memory_mismatches(predicted, measured, rtol=MEMORY_RTOL) == []


def test_explain_json_and_simulate_memory_on_the_command_line(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "pp=2,tp=2", "--all-ranks", "--json")
    assert code == 0
    mem = json.loads(out)["memory"]
    assert sorted(mem) == ["0", "1", "2", "3"]
    for m in mem.values():
        assert set(m) == {*CATEGORIES, "peak"}
        assert m["peak"] == sum(m[c] for c in CATEGORIES)
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "pp=2,tp=2")
    assert code == 0 and "Memory per rank, predicted" in out and "pp stage" in out
    code, out, _ = cli("simulate", "gpt-moe-tiny", "--mesh", "ep=2", "--memory")
    assert code == 0
    assert "Memory per rank, measured" in out
    assert "predicted = measured for every rank and category, to the byte" in out


def test_explain_device_says_whether_it_fits(cli) -> None:
    code, out, _ = cli("explain", "gpt-tiny", "--mesh", "dp=2", "--device", "h100-80gb",
                       "--json")
    assert code == 0
    d = json.loads(out)
    peak = max(m["peak"] for m in d["memory"].values())
    assert d["device"] == {"name": "h100-80gb", "memory": 80 * 10**9, "fits": True,
                           "largest_peak": peak, "largest_peak_rank": 0}
    # 7B parameters with AdamW on one 80 GB device: 16 bytes a parameter alone is too much
    code, out, _ = cli("explain", "gpt-7b", "--mesh", "dp=1", "--device", "a100-80gb")
    assert code == 0 and "does not fit on a100-80gb: rank 0 needs" in out
    code, _, err = cli("explain", "gpt-tiny", "--mesh", "dp=2", "--device", "a100")
    assert code == 2
    assert "unknown device; the profiles are a100-80gb, h100-80gb, h200, b200, cpu" in err
