"""The pure DSL: types, validation, annotations and single-device semantics."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardlang as sl


def test_mesh_repr_parse_size_and_layout() -> None:
    m = sl.Mesh(dp=2, tp=2)
    assert repr(m) == "Mesh(dp=2, tp=2)"
    assert sl.Mesh.parse("tp=2, dp=2") == m and hash(sl.Mesh.parse("dp=2,tp=2")) == hash(m)
    big = sl.Mesh.parse("dp=8,pp=8,tp=8,sp=2")
    assert big.size == 1024 and list(big.shape) == ["pp", "dp", "sp", "tp"]
    # canonical order pp, dp, ep, sp, tp: tp is fastest
    assert m.coordinate(1) == {"pp": 0, "dp": 0, "ep": 0, "sp": 0, "tp": 1}
    assert m.group(3, "dp") == (1, 3) and m.group(3, "tp") == (2, 3)
    assert repr(sl.Mesh()) == "Mesh()" and sl.Mesh().size == 1


def test_spec_repr_and_one_axis_one_dim() -> None:
    assert repr(sl.P("dp", None, ("sp", "tp"))) == "P('dp', None, ('sp', 'tp'))"
    assert sl.P("dp", None).mesh_axes == ("dp",)
    with pytest.raises(sl.ShardingError, match=r"P\('tp', 'tp'\) uses mesh axis 'tp' twice"):
        sl.P("tp", "tp")
    with pytest.raises(sl.ShardingError, match="unknown mesh axis 'tq'.*did you mean 'tp'"):
        sl.P("tq")


def test_rules_repr_spec_and_parse() -> None:
    r = sl.Rules(batch="dp", heads="tp")
    assert repr(r) == "Rules(batch='dp', heads='tp')"
    assert r.spec(("batch", None, "heads")) == sl.P("dp", None, "tp")
    assert r.spec(("embed",)) == sl.P(None)  # no rule: replicated
    parsed = sl.Rules.parse("batch=dp+ep,seq=none", base=sl.Rules.default())
    assert parsed.mesh_entry("batch") == ("dp", "ep") and parsed.mesh_entry("seq") is None
    assert parsed.mesh_entry("heads") == "tp"
    with pytest.raises(sl.ShardingError, match="did you mean 'heads'"):
        sl.Rules(hedas="tp").check_names({"embed"})
    sl.Rules(kv_heads="tp").check_names({"kv_heads"})  # a name the model uses is fine


def test_mesh_errors_name_the_axis() -> None:
    with pytest.raises(sl.ShardingError, match="'pp', 'dp', 'ep', 'sp', 'tp'"):
        sl.Mesh(xp=2)
    with pytest.raises(sl.ShardingError, match="positive integer"):
        sl.Mesh(dp=0)
    with pytest.raises(sl.ShardingError, match="axis=size"):
        sl.Mesh.parse("dp2")


def test_axes_and_annotate_by_glob() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    sl.annotate(m, {"0.weight": ("mlp", "embed"), "*.bias": (None,), "2.weight": ("embed", "mlp")})
    assert sl.logical_axes(m[0].weight) == ("mlp", "embed")
    assert sl.logical_axes(m[2].bias) == (None,)
    with pytest.raises(sl.ShardingError, match="matches no parameter.*did you mean '0.weight'"):
        sl.annotate(m, {"0.weigth": ("mlp", "embed")})
    with pytest.raises(sl.ShardingError, match="has 2 dims .* but 1 logical axes"):
        sl.annotate(m, {"0.weight": ("mlp",)})
    p = sl.axes(nn.Parameter(torch.zeros(3, 5)), "heads", None)
    assert sl.logical_axes(p) == ("heads", None)


def test_single_device_semantics() -> None:
    x = torch.randn(2, 3, 4)
    assert sl.constrain(x, "batch", "seq", "embed") is x
    for y in (sl.psum(x, "tp"), sl.all_gather(x, "tp", dim=1), sl.psum_scatter(x, "tp", dim=1),
              sl.all_to_all(x, "ep", split_dim=0, concat_dim=0), sl.ppermute(x, "sp", shift=1)):
        assert y is x
    f = sl.shard_map(lambda a: sl.psum(a * 2, "tp"), in_axes=(("batch", "seq", "mlp"),),
                     out_axes=("batch", "seq", None))
    assert torch.equal(f(x), x * 2)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(sl.attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(sl.ShardingError, match="3 dims but 2 logical axes"):
        sl.constrain(x, "batch", "seq")


def test_shardlang_never_imports_distributed_or_lowering() -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    bad = re.compile(r"^\s*(import|from)\s+(torch\.distributed|lowering)\b", re.M)
    for path in (root / "shardlang").glob("*.py"):
        assert not bad.search(path.read_text()), path
    for path in (root / "models").glob("*.py"):
        assert "import lowering" not in path.read_text() and "from lowering" not in path.read_text()


# -- sl.annotate(inputs=, outputs=): activation constraints from outside ----------------------
def test_annotate_inputs_outputs_constrain_from_outside_at_megatron_minimum() -> None:
    """The third-party decoder, constrained from outside where Megatron converts: at the
    inputs of the column-parallel linears and the head (the norms' outputs) and
    at each row-parallel output: 13 tp all-reduces for 2 layers, wire = analytic."""
    from lowering.run import Layout, explain
    from lowering.run.registry import ModelRef
    from tests.third_party_llama import annotated

    act = ("batch", "seq", "embed")

    def build() -> torch.nn.Module:
        return sl.annotate(annotated(), inputs={"layers.*": act}, outputs={
            "layers.*.input_norm": act, "layers.*.post_norm": act, "norm": act,
            "layers.*.o_proj": act, "layers.*.down_proj": act})

    m = build()
    assert sl.activation_axes(m.layers[0]) == (act, None)
    assert sl.activation_axes(m.layers[1].o_proj) == (None, act)
    assert m(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 128)  # one device: identity
    ex = explain(Layout(ModelRef("outside", build), sl.Mesh(tp=2)))
    assert "embed" in ex.plan.trace.names  # the model now constrains its activations itself
    tp = [r for r in ex.schedules.ranks[0] if r.axis == "tp"]
    assert len(tp) == 13 and ex.analytic["tp"].wire_bytes == sum(r.wire_bytes for r in tp)


def test_annotate_inputs_outputs_bad_patterns_are_sharding_errors() -> None:
    from tests.third_party_llama import annotated

    m = annotated()
    with pytest.raises(sl.ShardingError, match=r"matches no module.*did you mean 'layers.0'"):
        sl.annotate(m, inputs={"layer.0": ("batch", "seq", "embed")})
    sl.annotate(m, outputs={"layers.*": ("batch", "seq", "embed")})
    sl.annotate(m, outputs={"layers.*": ("batch", None, "embed")})  # re-annotating replaces
    assert sl.activation_axes(m.layers[0]) == (None, ("batch", None, "embed"))
