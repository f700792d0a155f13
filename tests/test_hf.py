"""Hugging Face models as they come (default attention, experts and cache): tiny configs
of real architectures match one device on every axis, reach Megatron's minimum under tp,
run expert parallelism as all-to-alls, trace in dry mode, and fail clearly on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowering
import models.hf
import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.schedule import Record
from tests.hf_models import TINY

ROOT = Path(__file__).resolve().parents[1]


def _layout(model: str, mesh: str, **options: object) -> Layout:
    return Layout(resolve(f"tests.hf_models:{model}"), sl.Mesh.parse(mesh), sl.Rules.default(),
                  **options)  # type: ignore[arg-type]


# -- parity: every rank matches the single-device model ------------------------------------
def _hf(model: str) -> str:
    """The CLI's spelling of a tiny config: ``hf:NAME --config k=v,...``."""
    return ",".join(f"{k}={v}" for k, v in TINY[model][1].items())


MATRIX = [(m, mesh, o) for m in ("llama", "qwen2", "mistral", "gpt2", "mixtral")
          for mesh, o in (("tp=2", {}), ("dp=2,tp=2", {}), ("sp=2", {}), ("pp=2", {}),
                          ("dp=2", {"fsdp": True}))]
PARITY = MATRIX + [
    ("mixtral", "ep=2", {}), ("mixtral", "dp=2,ep=2", {}), ("qwen2_moe", "ep=2", {}),
    ("qwen2_moe", "dp=2,ep=2", {}), ("llama", "sp=2", {"load_balance": True}),
    ("llama", "dp=2,tp=2", {"fsdp": True}), ("qwen3", "sp=2", {}), ("bert", "tp=2", {}),
    ("qwen3_moe", "dp=2,ep=2", {"fsdp": True}), ("opt_annotated", "tp=2", {}),
    # no tp plan: every axis but tp works unannotated (tp=2 is refused, see BAD)
    ("opt", "dp=2", {"fsdp": True}), ("opt", "pp=2", {}), ("opt", "sp=2", {}),
    # the model's own F.scaled_dot_product_attention with an explicit mask: global view
    ("falcon", "dp=2", {}), ("falcon", "sp=2", {}),
]


@pytest.mark.parametrize(("model", "mesh", "options"), PARITY,
                         ids=[f"{m}-{mesh}{'-' + '-'.join(o) if o else ''}" for m, mesh, o in PARITY])
def test_hf_model_matches_single_device(model: str, mesh: str, options: dict) -> None:
    """2 steps, fp32, rtol = atol = 1e-5, HF's defaults; built as ``hf:NAME --config ...``
    where the architecture is built in, else from the factory in tests/hf_models.py."""
    ref = resolve(f"hf:{TINY[model][0]}", config=_hf(model)) if model in TINY else resolve(
        f"tests.hf_models:{model}")
    lay = Layout(ref, sl.Mesh.parse(mesh), sl.Rules.default(), **options)  # type: ignore[arg-type]
    result, parity = simulate(lay, steps=2, check=True)
    assert parity is not None and parity.ok, parity.lines
    assert len(result.losses) == 2


# -- the schedule: Megatron's minimum, one schedule in every mode ---------------------------
def _on(records: list[Record], axis: str) -> list[Record]:
    return [r for r in records if r.axis == axis]


@pytest.mark.parametrize("model", ["llama", "qwen2", "gpt2", "bert", "opt_annotated"])
def test_tp_reaches_megatron_minimum_with_the_analytic_bytes(model: str) -> None:
    """2 all-reduces forward + 2 backward per layer, 1 for the vocab-parallel embedding, 1
    for the head's input gradient and 3 small ones for the loss: 2*4 + 5 = 13."""
    lay = _layout(model, "tp=2")
    ex = explain(lay)
    tp = _on(ex.schedules.ranks[0], "tp")
    assert len(tp) == 13 and {r.op.value for r in tp} == {"all_reduce"}, [
        (r.op.value, r.site, r.shape) for r in tp]
    assert ex.analytic["tp"].wire_bytes == sum(r.wire_bytes for r in tp)
    result, _ = simulate(lay, steps=1)
    assert [r.signature() for r in result.records] == [r.signature() for r in ex.schedules.ranks[0]]


def test_dp_tp_gathers_no_tensor_parallel_weight() -> None:
    ex = explain(_layout("llama", "dp=2,tp=2"))
    tp = _on(ex.schedules.ranks[0], "tp")
    assert len(tp) == 13 and not [r for r in tp if r.op.value == "all_gather"]
    for axis in ("dp", "tp"):
        assert ex.analytic[axis].wire_bytes == sum(r.wire_bytes for r in _on(
            ex.schedules.ranks[0], axis)), axis


@pytest.mark.parametrize(("model", "mesh"), [("mixtral", "ep=2"), ("qwen2_moe", "dp=2,ep=2"),
                                             ("qwen3_moe", "ep=2,tp=2")])
def test_expert_parallelism_is_two_plus_two_all_to_alls_per_moe_layer(model: str, mesh: str) -> None:
    lay = _layout(model, mesh)
    ex = explain(lay)
    a2a = [r for r in ex.schedules.ranks[0] if r.op.value == "all_to_all"]
    fwd = [r for r in a2a if r.phase.value == "forward"]
    assert len(fwd) == 2 * 2 and len(a2a) - len(fwd) == 2 * 2, [(r.phase.value, r.site) for r in a2a]
    assert {r.axis for r in a2a} == {"ep"}
    assert not [r for r in ex.schedules.ranks[0] if r.axis == "ep" and r.op.value == "all_gather"]
    for axis in ex.analytic:
        assert ex.analytic[axis].wire_bytes == sum(
            r.wire_bytes for r in _on(ex.schedules.ranks[0], axis)), axis
    result, parity = simulate(lay, steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    stats = result.metrics[0]
    for layer in (0, 1):  # router statistics, as for gpt-moe-tiny
        assert sum(stats[f"moe{layer}.tokens_per_expert"]) == 8 * 32 * 2  # type: ignore[arg-type]
        assert stats[f"moe{layer}.dropped"] == 0


def test_ring_attention_for_hf_attention_carries_key_value_heads() -> None:
    """seq -> sp runs shardlang's ring: ppermutes of K and V blocks (2 kv heads of 4)."""
    ex = explain(_layout("llama", "sp=2", load_balance=True))
    sp = _on(ex.schedules.ranks[0], "sp")
    assert sp and {r.op.value for r in sp} >= {"permute"}
    assert not [r for r in sp if r.op.value == "all_gather" and r.phase.value == "forward"]
    kv = [r for r in sp if r.op.value == "permute" and r.phase.value == "forward"]
    # K and V stacked: (2, batch, kv heads, seq / sp, head_dim), 1 ring step per layer
    assert len(kv) == 2 and all(r.shape[:3] == (2, 8, 2) for r in kv), [r.shape for r in kv]
    assert ex.analytic["sp"].wire_bytes == sum(r.wire_bytes for r in sp)



@pytest.mark.parametrize("mesh", ["dp=2", "sp=2"])
def test_a_models_own_masked_sdpa_traces_the_schedule_it_runs(mesh: str) -> None:
    """Falcon calls F.scaled_dot_product_attention with a mask it builds: under a plan it
    runs as sl.attention(mask=...) in global view, in dry mode too (dry mode's fused-kernel
    stand-in leaves DTensors to the plan), so explain records what simulate runs: under
    dp no sp collective, under sp the key and value gathered in each layer's attention."""
    lay = _layout("falcon", mesh)
    ex = explain(lay)
    result, _ = simulate(lay, steps=1)
    assert [r.signature() for r in result.records] == [r.signature() for r in ex.schedules.ranks[0]]
    gathers = [r for r in _on(ex.schedules.ranks[0], "sp")
               if r.phase.value == "forward" and r.op.value == "all_gather"]
    assert len(gathers) == (4 if mesh == "sp=2" else 0)
    assert all("self_attention" in r.site for r in gathers)

def test_pipeline_stages_follow_the_layer_stack() -> None:
    ex = explain(_layout("llama", "pp=2"))
    stages = {p.name.split(".")[2] for p in ex.plan.params if p.name.startswith("model.layers.")}
    assert stages == {"0", "1"}
    sends = [r for r in ex.schedules.ranks[0] if r.axis == "pp"]
    assert sends and ex.analytic["pp"].wire_bytes == sum(r.wire_bytes for r in sends)


@pytest.mark.parametrize("model", sorted(TINY))
def test_every_tiny_architecture_explains_on_a_3d_mesh(model: str) -> None:
    """Dry mode traces HF code as it is (its masks ask data-dependent questions of meta
    tensors: shardlang answers those from known values)."""
    ex = explain(_layout(model, "dp=2,tp=2"))
    assert _on(ex.schedules.ranks[0], "tp") and _on(ex.schedules.ranks[0], "dp")


# -- the model contract and the loader ------------------------------------------------------
def test_load_gives_logits_and_hf_forward_stays_available() -> None:
    source, overrides = TINY["llama"]
    m = models.hf.load(source, **overrides)
    ids = torch.randint(0, 128, (2, 8))
    logits = m(ids)
    assert logits.shape == (2, 8, 128)
    out = m(input_ids=ids, use_cache=False)  # HF's own call, unchanged
    torch.testing.assert_close(out.logits, logits)
    assert sl.logical_axes(m.model.layers[0].self_attn.q_proj.weight) == ("heads", "embed")
    assert sl.logical_axes(m.model.layers[0].mlp.down_proj.weight) == ("embed", "mlp")


def test_builtin_names_carry_the_published_hyperparameters() -> None:
    from models.hf.configs import build_config

    c = build_config("llama-3-405b", {})
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (16384, 126, 128, 8, 53248, 128256)
    c = build_config("mixtral-8x7b", {})
    assert (c.num_local_experts, c.num_experts_per_tok, c.hidden_size) == (8, 2, 4096)
    for name in ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "qwen3-8b",
                 "qwen3-30b-a3b", "gpt2", "gpt2-xl", "bert-base"):
        assert name in models.hf.BUILTIN


# -- bad input --------------------------------------------------------------------------------
BAD = [
    (["explain", "hf:llama-3-8b", "--mesh", "tp=2", "--config", "num_hiden_layers=2"],
     ["num_hiden_layers", "did you mean 'num_hidden_layers'"]),
    (["explain", "hf:lama-3-8b", "--mesh", "tp=2"], ["unknown Hugging Face model", "did you mean 'hf:llama-3-8b'"]),
    (["explain", "tests.hf_models:llama", "--mesh", "tp=4"],
     ["mesh axis 'tp' (size 4)", "choose tp in {1, 2}"]),
    (["explain", "tests.hf_models:opt", "--mesh", "tp=2"],
     ["no tensor-parallel plan", "model.decoder.layers", "self_attn.q_proj", "sl.annotate",
      "models.hf.load(model)"]),
    (["explain", "gpt-tiny", "--mesh", "tp=2", "--config", "n_layer=2"], ["--config", "not one"]),
]


@pytest.mark.parametrize(("argv", "pieces"), BAD, ids=[" ".join(a[1:3]) for a, _ in BAD])
def test_bad_input_is_one_clear_line_exit_2(cli, argv: list[str], pieces: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err + out
    for piece in pieces:
        assert piece in err, (piece, err)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)
        sl.annotate(self, {"embed.weight": ("vocab", "embed"), "head.weight": ("vocab", "embed")})


class _DataDependent(_Tiny):
    """Branches on a value computed from its input: a shape only real data can decide."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        keep = (x.sum(-1) > 0).nonzero()  # how many rows: known only from the data
        return self.head(x) + keep.shape[0] * 0


class _ConstantChecks(_Tiny):
    """Asks data-dependent questions of tensors built from constants (as HF's masks do)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        if not mask.all():  # a Python bool from a meta tensor
            raise AssertionError("the answer is known: every element is True")
        n = int(torch.arange(4, device=idx.device).sum())
        return self.head(self.embed(idx)) * (n / 6)


def test_dry_mode_answers_from_known_values_and_names_the_module_otherwise() -> None:
    from lowering.run.registry import ModelRef

    ok = Layout(ModelRef("constant-checks", _ConstantChecks), sl.Mesh(tp=2))
    assert _on(explain(ok).schedules.ranks[0], "tp")
    bad = Layout(ModelRef("data-dependent", _DataDependent), sl.Mesh(tp=2))
    with pytest.raises(sl.ShardingError, match=r"(?s)data-dependent.*nonzero|nonzero.*data"):
        explain(bad)


def test_known_values_cover_large_constant_masks_and_forget_stale_writes() -> None:
    """The all-ones attention mask of a published batch (2,048 x 8,192: over the shadow
    limit) still answers HF's ``fast_all``; a view keeps its shadow; a tensor written in
    place from an untracked value loses it (a stale answer would be a wrong schedule)."""
    from lowering.plan.meta import LIMIT, KnownValues

    with KnownValues():
        mask = torch.ones(2048, 8192, dtype=torch.long, device="meta")
        assert mask.numel() > LIMIT
        assert bool(mask.sum() == mask.numel())
        assert bool(mask.bool().all()) and int((mask.float() * 3 + 1).max()) == 4
        assert bool(mask[:, :16].all()) and bool(mask.expand(2, 2048, 8192)[1, 0, 0] == 1)
        assert float(torch.full((4096, 4096), 2.5, device="meta").max()) == 2.5
        z = torch.zeros(4, device="meta")
        assert not bool(z.any())
        z.copy_(torch.empty(4, device="meta"))  # values dry mode does not know
        with pytest.raises(sl.ShardingError, match="data-dependent"):
            bool(z.any())


# -- run mode: one torchrun launch, several layouts -------------------------------------------
@pytest.mark.torchrun
def test_run_mode_under_torchrun_records_the_dry_schedule(tmp_path: Path) -> None:
    """2 processes: llama tp=2, mixtral ep=2 and llama pp=2 each match one device over 5
    steps, and every rank's recorded schedule equals dry mode's."""
    specs = ["tests.hf_models:llama/tp=2/-/-", "tests.hf_models:mixtral/ep=2/-/-",
             "tests.hf_models:llama/pp=2/1f1b/2"]
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--tee", "3", str(ROOT / "tests" / "pipeline_worker.py"), str(out), *specs],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads(out.read_text())
    from tests.pipeline_worker import layout_of

    for spec in specs:
        assert all(got[spec]["ok"]), (spec, got[spec]["lines"])
        lay = layout_of(spec)
        dry = explain(lay, ranks=[0, 1])
        for r, recs in dry.schedules.ranks.items():
            assert got[spec]["ranks"][str(r)] == [x.json(lay.mesh, r) for x in recs], (spec, r)


# -- weights from a folder: each rank reads only its shard ----------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved by transformers itself (seed 123: not what seed 0 initializes)."""
    import transformers

    from models.hf.configs import build_config

    out = {}
    for name in ("llama", "gpt2", "mixtral"):
        source, overrides = TINY[name]
        torch.manual_seed(123)
        model = transformers.AutoModelForCausalLM.from_config(build_config(source, overrides))
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


@pytest.mark.parametrize("model", ["llama", "gpt2", "mixtral"])
def test_a_folder_loads_the_logits_transformers_computes(saved: dict[str, Path], model: str) -> None:
    import transformers

    ids = torch.randint(0, 128, (2, 16))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(saved[model])(ids).logits
    torch.testing.assert_close(models.hf.load(str(saved[model]))(ids), theirs, rtol=1e-5, atol=1e-5)


def test_a_pipeline_only_mesh_reads_the_folders_weights(saved: dict[str, Path]) -> None:
    """pp=2 alone distributes nothing within a stage (each stage is one device): the weights
    are read whole there. Before, they were never read: the run trained seed 0's random
    initialization, not the folder's model, and --check failed."""
    lay = Layout(resolve(f"hf:{saved['llama']}"), sl.Mesh.parse("pp=2"), sl.Rules.default())
    result, parity = simulate(lay, steps=1, check=True)
    assert parity is not None and parity.ok, parity.lines
    # the user's loop: a model built to be read later, on pp=2
    theirs = models.hf.load(str(saved["llama"]))
    with sl.read_later():
        model = models.hf.load(str(saved["llama"]))
    par = lowering.parallelize(model, "pp=2", microbatches=2)
    want = dict(theirs.named_parameters())
    for name, p in model.named_parameters():
        got = par.values(p)[0]
        assert torch.equal(got, want[name].detach()), name
    par.close()


def test_a_deep_copy_of_a_hf_model_runs_its_own_weights() -> None:
    """The contract forward calls the class's forward on the model it is called on: a
    copy (a user's reference model) whose weights change computes with them, not the
    original's."""
    import copy

    source, overrides = TINY["llama"]
    model = models.hf.load(source, **overrides)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    ids = torch.randint(0, 128, (1, 8))
    assert twin(ids).abs().max() == 0 and model(ids).abs().max() > 0


def test_each_rank_reads_only_its_shard(saved: dict[str, Path], monkeypatch) -> None:
    import models.hf.weights as weights

    asked: list[tuple[str, tuple[slice, ...] | None]] = []
    read = weights.read_block

    def spy(file, key, src, block=None):  # noqa: ANN001, ANN202
        asked.append((key, block))
        return read(file, key, src, block)
    monkeypatch.setattr(weights, "read_block", spy)
    for name, mesh in (("llama", "tp=2"), ("gpt2", "dp=2,tp=2")):
        asked.clear()
        lay = Layout(resolve(f"hf:{saved[name]}"), sl.Mesh.parse(mesh), sl.Rules.default())
        result, parity = simulate(lay, steps=1, check=True)  # the reference reads whole tensors
        assert parity is not None and parity.ok, parity.lines
        blocks = [b for k, b in asked if b is not None]
        assert blocks, "the distributed model read no block"
        key = {"llama": "model.layers.0.self_attn.q_proj.weight",
               "gpt2": "transformer.h.0.attn.c_attn.weight"}[name]
        mine = [(b[0].start, b[0].stop) for k, b in asked if k == key and b is not None]
        # q (64 rows) split over tp: rows 0-32 and 32-64 (for GPT-2: of each part of c_attn)
        assert sorted(set(mine)) == [(0, 32), (32, 64)], mine
