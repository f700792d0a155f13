"""A plain-torch decoder (separate q/k/v/o and gate/up/down, RMSNorm, rotary, direct
F.scaled_dot_product_attention) annotated only from outside with sl.annotate."""

from __future__ import annotations

import pytest
import torch

import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.run.train import TrainConfig, reference
from models.datasets import ArithmeticSequences

FACTORY = "tests.third_party_llama:annotated"


@pytest.mark.parametrize(("mesh", "fsdp"), [({"tp": 2}, False), ({"dp": 2, "tp": 2}, False),
                                            ({"dp": 2, "tp": 2}, True),
                                            ({"sp": 2}, False)])  # rotary on a split sequence
def test_third_party_decoder_matches_single_device(mesh: dict[str, int], fsdp: bool) -> None:
    lay = Layout(resolve(FACTORY), sl.Mesh(**mesh), sl.Rules.default(), fsdp=fsdp)
    got, parity = simulate(lay, steps=3, check=True)
    model = resolve(FACTORY)
    ref = reference(model.factory, ArithmeticSequences(128),
                    TrainConfig(steps=3, batch=8, seq=32, keep_grads=True))
    for name, per_rank in got.grads.items():
        for g in per_rank:
            torch.testing.assert_close(g, ref.grads[name][0], rtol=1e-5, atol=1e-5, msg=name)
    assert parity is not None and parity.ok
    assert len(got.grads) == len(list(model.build().parameters()))


def test_annotations_from_outside_reach_the_plan() -> None:
    ex = explain(Layout(resolve(FACTORY), sl.Mesh(tp=2)))
    roles = {p.name: p.role.value for p in ex.plan.params}
    assert roles["layers.0.q_proj.weight"] == "column-parallel"
    assert roles["layers.1.down_proj.weight"] == "row-parallel"
    assert roles["embed_tokens.weight"] == "vocab-parallel"
    assert roles["layers.0.input_norm.weight"] == "replicated"
    assert any(r.axis == "tp" for r in ex.schedules.ranks[0])
