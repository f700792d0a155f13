"""Simulate-mode parity: every rank's loss and gradients equal the single-device model."""

from __future__ import annotations

import pytest
import torch

from lowering.run import check_parity, simulate
from lowering.run.train import TrainConfig, reference
from models import PRESETS
from models.datasets import ArithmeticSequences
from tests.conftest import layout

LAYOUTS = [
    pytest.param({"dp": 2}, False, id="dp2"),
    pytest.param({"dp": 4}, False, id="dp4"),
    pytest.param({"tp": 2}, False, id="tp2"),
    pytest.param({"tp": 4}, False, id="tp4"),
    pytest.param({"dp": 2, "tp": 2}, False, id="dp2xtp2"),
    pytest.param({"dp": 4}, True, id="fsdp-dp4"),
    pytest.param({"dp": 2, "tp": 2}, True, id="fsdp-dp2xtp2"),
]


@pytest.fixture(scope="module")
def single_device() -> dict[str, object]:
    cfg = TrainConfig(steps=5, batch=8, seq=32, keep_grads=True)
    return {"cfg": cfg, "ref": reference(PRESETS["gpt-tiny"].factory, ArithmeticSequences(), cfg)}


@pytest.mark.parametrize(("mesh", "fsdp"), LAYOUTS)
def test_gpt_tiny_matches_single_device(mesh: dict[str, int], fsdp: bool,
                                        single_device: dict[str, object]) -> None:
    ref = single_device["ref"]
    got, parity = simulate(layout(fsdp=fsdp, **mesh), steps=5, check=True)
    world = 1
    for n in mesh.values():
        world *= n
    assert set(got.grads) == set(ref.grads)
    for name, per_rank in got.grads.items():
        assert len(per_rank) == world
        for g in per_rank:  # every rank's full gradient after the step's collectives
            torch.testing.assert_close(g, ref.grads[name][0], rtol=1e-5, atol=1e-5, msg=name)
    for step, (losses, (want,)) in enumerate(zip(got.losses, ref.losses)):
        assert len(losses) == world
        tol = 1e-5 if step == 0 else 1e-4
        assert max(abs(v - want) for v in losses) <= tol, (step, losses, want)
    assert parity is not None and parity.ok


def test_check_names_the_parameter_on_mismatch(cli) -> None:
    code, out, _ = cli("simulate", "tests.broken_models:local_mean_lm", "--mesh", "dp=2",
                       "--steps", "1", "--check")
    assert code == 1
    assert "check FAILED" in out and ".weight differs by" in out


def test_check_parity_flags_a_perturbed_gradient(single_device: dict[str, object]) -> None:
    ref = single_device["ref"]
    got, _ = simulate(layout(dp=2), steps=1, check=True)
    got.grads["wte.weight"][1] = got.grads["wte.weight"][1] + 1e-3
    p = check_parity(got, ref)
    assert not p.ok and p.worst_param == "wte.weight" and p.worst_rank == 1


def test_bf16_check_bounds_rounding_by_the_models_own_bf16_error(cli) -> None:
    """--check --precision bf16: the parallel run differs from the bf16 reference by
    rounding only (bounded by the bf16 reference's distance from fp32), the loss is
    computed in fp32 (not rounded to bf16's 8 bits), and a real bug still fails."""
    from lowering.run import Layout

    got, parity = simulate(Layout.of("gpt-tiny", "dp=2,tp=2", precision="bf16", fsdp=True),
                           steps=3, check=True)
    assert parity is not None and parity.ok, parity.lines
    assert "bf16" in parity.tolerance and parity.worst_err > 1e-5  # fp32's bound would fail
    loss = got.losses[0][0]
    assert torch.tensor(loss).bfloat16().float().item() != loss  # an fp32 loss
    # a model whose dp ranks disagree (a mean over local rows) fails under bf16 too
    code, out, _ = cli("simulate", "tests.broken_models:local_mean_lm", "--mesh", "dp=2",
                       "--steps", "1", "--check", "--precision", "bf16")
    assert code == 1 and "check FAILED" in out, out
