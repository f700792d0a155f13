"""Bad input: a ShardingError that names the tensor or module, the axis and a fix; the
CLI prints it in one paragraph without a traceback and exits 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowering
import shardlang as sl
from models import PRESETS

CASES = [
    # (argv, pieces the one-line message must contain)
    (["--mesh", "xp=2"], ["unknown mesh axis 'xp'", "'pp', 'dp', 'ep', 'sp', 'tp'", "did you mean 'tp'"]),
    (["--mesh", "tp=3"], ["mesh axis 'tp' (size 3)", "'heads' (size 4)", "blocks.0.attn",
                          "choose tp in {1, 2, 4}"]),
    (["--mesh", "tp=8"], ["'heads' (size 4)", "choose tp in {1, 2, 4}"]),
    (["--mesh", "dp=3", "--batch", "8"], ["mesh axis 'dp' (size 3)", "'batch' (size 8)", "choose dp in {1, 2, 4, 8}"]),
    (["--mesh", "tp=2", "--rules", "hedas=tp"], ["'hedas'", "did you mean 'heads'"]),
    (["--mesh", "tp=2", "--rules", "heads=tp,embed=tp"], ["uses mesh axis 'tp' twice",
                                                          "a mesh axis may shard only one dim"]),
]


@pytest.mark.parametrize(("argv", "pieces"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli_bad_input_is_one_paragraph_exit_2(cli, argv: list[str], pieces: list[str]) -> None:
    code, out, err = cli("explain", "gpt-tiny", *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    for piece in pieces:
        assert piece in err, (piece, err)


def test_mesh_size_differs_from_launched_world_size() -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    p = subprocess.run([sys.executable, "-m", "lowering", "run", "gpt-tiny", "--mesh", "dp=4",
                        "--steps", "1"], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 2
    assert "mesh Mesh(dp=4) has 4 ranks but 2 processes were launched" in p.stderr
    assert "torchrun --nproc-per-node 4" in p.stderr and "Traceback" not in p.stderr


def test_python_errors_name_the_tensor() -> None:
    model = PRESETS["gpt-tiny"].factory()
    with pytest.raises(sl.ShardingError, match=r"'vocab' \(size 256\) of wte\.weight.*tp in \{1, 2, 4"):
        lowering.lower(model, sl.Mesh(tp=3), sl.Rules.default())  # no shapes: parameter check
    with pytest.raises(sl.ShardingError, match=r"'heads' \(size 4\) of attention in blocks\.0\.attn"):
        lowering.lower(model, sl.Mesh(tp=8), sl.Rules.default(), batch=8, seq=32)
    with pytest.raises(sl.ShardingError, match=r"P\('tp', 'tp'\) for blocks\.0\.mlp\.up\.weight"):
        lowering.lower(model, sl.Mesh(tp=2), sl.Rules(mlp="tp", embed="tp"))
    with pytest.raises(sl.ShardingError, match=r"pp\*v = 8\*1 = 8 pipeline chunks but .* 4 layers"):
        lowering.lower(model, sl.Mesh(pp=8), sl.Rules.default())


def test_errors_are_value_errors_not_assertions() -> None:
    assert issubclass(sl.ShardingError, ValueError)
    m = nn.Linear(4, 4)
    sl.axes(m.weight, "mlp", "embed")
    with pytest.raises(ValueError):
        lowering.lower(m, sl.Mesh(tp=3), sl.Rules(mlp="tp"))


def test_collective_outside_shard_map_and_unreduced_output() -> None:
    from lowering.run.functions import trace_function

    with pytest.raises(sl.ShardingError, match="outside a shard_map region"):
        trace_function(lambda x: sl.psum(x, "tp"), [torch.ones(2, 4)], mesh=sl.Mesh(tp=2),
                       rules=sl.Rules())
    f = sl.shard_map(lambda x, w: x @ w, in_axes=((None, "k"), ("k", None)), out_axes=(None, None))
    with pytest.raises(sl.ShardingError, match="varies over mesh axis 'tp'.*sl.psum"):
        trace_function(f, [torch.ones(2, 4), torch.ones(4, 3)], mesh=sl.Mesh(tp=2),
                       rules=sl.Rules(k="tp"))


def test_unknown_model_and_bad_factory(cli) -> None:
    code, _, err = cli("explain", "gpt-huge", "--mesh", "dp=2")
    assert code == 2 and "unknown model 'gpt-huge'" in err and "gpt-tiny" in err
    code, _, err = cli("explain", "tests.broken_models:nope", "--mesh", "dp=2")
    assert code == 2 and "no callable 'nope'" in err
    code, _, err = cli("simulate", "gpt-7b", "--mesh", "dp=2", "--steps", "1")
    assert code == 2 and "dry mode only" in err
