"""What a new user meets first: declared dependencies, clean errors for bad input, the
run-time check on third-party models, one schedule in every mode, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import torch.distributed as dist

import lowering.run.guard as guard
from lowering.run import Layout, explain, simulate
from lowering.run.guard import CollectiveGuard, CollectiveMismatch

ROOT = Path(__file__).resolve().parents[1]
#: imported when present, never required (the importer falls back without them)
OPTIONAL = {"tqdm": "torch.hub: progress bars if installed"}
LLAMA = "tests.third_party_llama:annotated"

_PROBE = """
import importlib.metadata as md, json, sys
from lowering.cli import main
main(["explain", "gpt-tiny", "--mesh", "dp=2,tp=2", "--json"])
dists = md.packages_distributions()
top = {m.split(".")[0] for m in list(sys.modules)}
used = sorted({d for t in top for d in dists.get(t, [])})
print(json.dumps(used), file=sys.stderr)
"""


def _requires(dist_name: str) -> set[str]:
    import importlib.metadata as md
    import re

    out = set()
    for req in md.requires(dist_name) or []:
        if "extra ==" in req:
            continue
        out.add(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def test_every_distribution_the_first_command_imports_is_declared() -> None:
    """The README's first command, in a fresh process: every installed distribution it
    imports (torch's lazy imports included: numpy) is declared in pyproject.toml or
    required by one that is (a fresh venv would otherwise fail)."""
    p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    used = {d.lower().replace("_", "-") for d in json.loads(p.stderr.strip().splitlines()[-1])}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    closure, todo = set(declared), list(declared)
    while todo:
        for dep in _requires(todo.pop()) - closure:
            closure.add(dep)
            todo.append(dep)
    missing = sorted(used - closure - {"shardlang", "pip", "setuptools"} - set(OPTIONAL))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "numpy" in declared  # torch.distributed.tensor.debug imports it; torch does not declare it


def _name(req: str) -> str:
    import re
    return re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-")


# -- the run-time collective check -----------------------------------------------------------------
def _guards() -> tuple[list[CollectiveGuard], dist.TCPStore]:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = []
    for rank in (0, 1):
        client = dist.TCPStore("127.0.0.1", master.port, is_master=False)
        with mock.patch.object(guard, "default_store", return_value=client):
            out.append(CollectiveGuard(rank, timeout=5))
    return out, master


def _verify_both(guards: list[CollectiveGuard], sigs: list[dict]) -> dict[int, str]:
    errors = {0: "", 1: ""}

    def one(rank: int) -> None:
        try:
            guards[rank].verify("tp", sigs[rank])
        except CollectiveMismatch as e:
            errors[rank] = str(e)
    with mock.patch.object(guard, "group_ranks", return_value=[0, 1]):
        threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    return errors


def test_check_compares_what_must_agree_and_only_that() -> None:
    guards, _master = _guards()
    sig = {"op": "all_reduce", "axis": "tp", "shape": [8, 32, 32], "dtype": "float32"}
    # the same collective, named differently by two ranks (a site label, a phase): fine
    same = _verify_both(guards, [{**sig, "site": "layers.0", "phase": "forward"},
                                 {**sig, "site": "layers.0.o_proj", "phase": "backward"}])
    assert same == {0: "", 1: ""}
    # a different shape: both ranks stop, and the sites describe where
    diff = _verify_both(guards, [{**sig, "site": "a", "phase": "forward"},
                                 {**sig, "shape": [8, 31, 32], "site": "b", "phase": "forward"}])
    assert "disagree at their collective #1" in diff[0] and "at b" in diff[0]
    assert "[8, 31, 32]" in diff[1]


# -- one schedule in every mode ------------------------------------------------------------------
@pytest.mark.parametrize("mesh", ["tp=2", "dp=2,tp=2"])
def test_third_party_decoder_one_schedule_at_the_megatron_minimum(mesh: str) -> None:
    """Annotated on parameters only, the decoder gets Megatron's conversion points from
    its roles: 2 + 2 tp all-reduces per layer + embedding, head and loss (13 in all), the
    same in dry and simulate mode, and the single-device losses and gradients."""
    lay = Layout.of(LLAMA, mesh)
    ex = explain(lay)
    dry = ex.schedules.ranks[0]
    result, parity = simulate(lay, steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    assert [(r.signature(), r.site) for r in dry] == [(r.signature(), r.site) for r in result.records]
    tp = [r for r in dry if r.axis == "tp"]
    assert len(tp) == 13 and {r.op.value for r in tp} == {"all_reduce"}
    assert ex.analytic["tp"].wire_bytes == sum(r.wire_bytes for r in tp)



def test_third_party_decoder_on_sp_traces_the_ring_it_runs() -> None:
    """Its own F.scaled_dot_product_attention under seq -> sp is shardlang's ring in dry
    mode too (explain's fused-kernel stand-in once took the call first and failed inside
    torch): the same K/V permutes in explain and simulate, at the analytic bytes."""
    lay = Layout.of(LLAMA, "sp=2")
    ex = explain(lay)
    result, parity = simulate(lay, steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    dry = ex.schedules.ranks[0]
    assert [(r.signature(), r.site) for r in dry] == [(r.signature(), r.site) for r in result.records]
    sp = [r for r in dry if r.axis == "sp"]
    assert {r.op.value for r in sp if r.phase.value == "forward"} == {"permute"}
    assert ex.analytic["sp"].wire_bytes == sum(r.wire_bytes for r in sp)

@pytest.mark.torchrun
def test_third_party_decoder_run_mode_records_the_dry_schedule(tmp_path: Path) -> None:
    """``shardlang run`` on the third-party decoder (the run-time check on, by default):
    every rank's recorded schedule equals dry mode's, on 4 processes."""
    out = tmp_path / "run.json"
    p = subprocess.run(
        [sys.executable, "-m", "lowering", "run", LLAMA, "--mesh", "dp=2,tp=2", "--steps", "2",
         "--check", "--timeout", "240", "--schedule-json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "check passed" in p.stdout and "Traceback" not in p.stderr
    got = json.loads(out.read_text())
    ex = explain(Layout.of(LLAMA, "dp=2,tp=2"), ranks=[0, 1, 2, 3])
    for r in range(4):
        assert got["ranks"][str(r)] == [x.json(ex.schedules.mesh, r) for x in ex.schedules.ranks[r]]


# -- exit codes and bad input ---------------------------------------------------------------------
def test_explain_exits_4_when_it_predicts_a_hang(cli) -> None:
    code, out, _ = cli("explain", "models.debugging:rank_branch", "--mesh", "tp=2", "--all-ranks")
    assert code == 4 and "would hang" in out
    code, _, _ = cli("explain", "gpt-tiny", "--mesh", "tp=2", "--all-ranks")
    assert code == 0


BAD = [
    (["simulate", "gpt-tiny", "--mesh", "dp=2", "--steps", "-1"], ["steps=-1", "--steps -1"]),
    (["simulate", "gpt-tiny", "--mesh", "dp=2", "--lr", "-1"], ["lr=-1.0", "learning rate"]),
    (["explain", "gpt-tiny", "--mesh", "tp=-2"], ["size -2", "positive integer"]),
    (["simulate", "tests.broken_models:output_object", "--mesh", "dp=2", "--steps", "1"],
     ["not logits", "last_hidden_state", ".logits"]),
    (["simulate", "tests.broken_models:hidden_states", "--mesh", "dp=2", "--steps", "1",
      "--data", "README.md"], ["vocabulary of 256", "hidden states instead of logits"]),
    (["explain", "tests.third_party_llama:grouped_query", "--mesh", "tp=4"],
     ["mesh axis 'tp' (size 4)", "layers.0", "choose tp in {1, 2}"]),
    (["explain", "gpt-tiny", "--mesh", "dp=2", "--microbatches", "2"],
     ["microbatches=2 (--microbatches 2)", "needs a pipeline"]),
    (["explain", "gpt-tiny", "--mesh", "dp=2", "--load-balance"],
     ["load_balance=True (--load-balance)", "no mesh axis"]),
]


@pytest.mark.parametrize(("argv", "pieces"), BAD, ids=[" ".join(a[3:]) for a, _ in BAD])
def test_bad_input_is_one_paragraph_with_a_fix(cli, argv: list[str], pieces: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out + err
    for piece in pieces:
        assert piece in err, (piece, err)


def test_empty_data_file(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = cli("simulate", "gpt-tiny", "--mesh", "dp=2", "--data", str(empty))
    assert code == 2 and "is empty" in err and err.count("\n") == 1


def test_the_python_api_names_keyword_and_flag() -> None:
    import lowering
    import shardlang as sl
    from models import PRESETS

    model = PRESETS["gpt-tiny"].factory()
    with pytest.raises(sl.ShardingError, match=r"virtual=3 \(--virtual-stages 3\) needs a pipeline"):
        lowering.lower(model, sl.Mesh(dp=2), sl.Rules.default(), virtual=3, schedule="interleaved")
    with pytest.raises(sl.ShardingError, match=r"unknown layout option 'microbatch'.*'microbatches'"):
        lowering.lower(model, sl.Mesh(pp=2), sl.Rules.default(), microbatch=2)


def test_a_model_with_no_annotation_on_an_axis_is_warned_about(cli) -> None:
    code, _, err = cli("explain", "tests.third_party_llama:plain", "--mesh", "dp=2,tp=2")
    assert code == 0
    assert err.startswith("warning: nothing in TinyLlama is sharded over tp") and "dp" not in \
        err.split("over", 1)[1].split(":")[0]


def test_pure_pipeline_check_names_what_was_compared(cli) -> None:
    code, out, _ = cli("simulate", "gpt-tiny", "--mesh", "pp=2", "--steps", "1", "--check")
    assert code == 0 and "check passed" in out
    assert "in -" not in out and ("gradients exact" in out or "worst gradient error" in out)


def test_simulate_prints_time_per_step_and_tokens_per_second(cli) -> None:
    code, out, _ = cli("simulate", "mlp", "--mesh", "dp=2", "--steps", "2")
    assert code == 0
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all(" ms " in s and s.endswith("tok/s") for s in steps)
    assert "median" in out and "tokens/s" in out
