"""lowering.parallelize: a user's own model, loss, optimizer, scheduler and loop.

Every layout's losses equal the single-device run's; FSDP's dp wire is exactly
3(n-1)/n * psi with no extra forward; bf16 stays within its tolerance of the bf16
single-device reference; checkpoints resume bit-exactly and reshard; bad input is a
ShardingError. torchrun launches: tests/test_parallelize_launch.py."""

from __future__ import annotations

import copy

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowering
import shardlang as sl
from lowering.plan import analytic_volume
from models import GPT, GPTConfig
from tests import user_pipeline
from tests.user_loop import SEQ, VOCAB, TinyLM, batch, train

pytestmark = pytest.mark.timeout(300)


def losses(mesh: str, **kw: object) -> list[float]:
    got, par = train(mesh, **kw)
    par.close()
    return got


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return losses("", steps=5)


@pytest.mark.parametrize("mesh,fsdp", [("dp=2,tp=2", False), ("dp=2", True), ("tp=2", False),
                                       ("dp=2,sp=2", False)])
def test_a_user_loop_matches_one_device(reference: list[float], mesh: str, fsdp: bool) -> None:
    got = losses(mesh, steps=5, fsdp=fsdp)
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_accumulation_with_no_sync_matches_one_device() -> None:
    ref = losses("", steps=3, accumulate=2)
    got, par = train("dp=2", steps=3, accumulate=2)
    dp = [r for r in par.schedule() if r.axis == "dp" and r.site != "loss"]
    par.close()
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # no_sync: every gradient reduced once per step (not per microbatch), in one bucket
    # (TinyLM's 43,648 bytes are under DDP's 1 MiB first bucket)
    psi = sum(p.numel() * 4 for p in TinyLM().parameters())
    assert [r.bytes for r in dp] == [psi]


@pytest.mark.parametrize("bucket_kb,buckets", [(8, 5), (0, 7)])
def test_backward_alone_reduces_the_gradients_during_backward(bucket_kb: int,
                                                               buckets: int) -> None:
    torch.manual_seed(0)
    par = lowering.parallelize(TinyLM(tied=False), "dp=2", bucket_kb=bucket_kb)
    issued_before_emb: list[int] = []
    # the embedding runs backward last: when the gradient reaches its output, the head's,
    # down's and up's buckets are already on the wire
    def probe(g: torch.Tensor) -> None:
        issued_before_emb.append(sum(r.axis == "dp" and r.site != "loss"
                                     for r in par.recorder.records))

    par.model.emb.register_forward_hook(lambda m, i, out: [out.register_hook(probe), None][1])
    x, y = batch(0)
    loss = F.cross_entropy(par.model(par.shard(x)).reshape(-1, VOCAB), par.shard(y).reshape(-1))
    loss.backward()
    placements = {n: (tuple(p.grad.placements), tuple(p.placements))
                  for n, p in par.model.named_parameters()}
    recs = par.recorder.records
    par.close()
    assert all(g == want for g, want in placements.values())  # no sync call needed
    grads = [r for r in recs if r.axis == "dp" and r.site != "loss"]
    # 8 KiB buckets, reverse registration order: head (8 KiB) | down.bias + down.weight |
    # up.bias + up.weight | emb.weight (8 KiB) | pos (the root's own parameter registers
    # first, so it comes last); 0: one per parameter
    assert len(grads) == buckets and {r.phase.value for r in grads} == {"backward"}
    assert sum(r.bytes for r in grads) == sum(p.numel() * 4 for p in TinyLM(tied=False).parameters())
    assert issued_before_emb and 0 < issued_before_emb[0] < buckets


@pytest.mark.parametrize("tied", [True, False])
def test_fsdp_wire_is_three_times_psi_with_a_root_parameter(tied: bool) -> None:
    calls = {"n": 0}
    model = TinyLM(tied)
    model.up.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    _, par = train("dp=2", steps=1, fsdp=True, tied=tied, model=model)
    recs = par.schedule()
    par.close()
    psi = sum(p.numel() * 4 for p in TinyLM(tied).parameters())  # a tied weight once
    # the parameters' collectives (not the loss's token count, not the clipping norm)
    dp = [r for r in recs if r.axis == "dp" and r.site not in ("loss", "clip_grad_norm_")]
    assert sum(r.wire_bytes for r in dp) == 3 * (2 - 1) / 2 * psi
    ops = {(r.phase.value, r.op.value) for r in dp}
    assert ops == {("forward", "all_gather"), ("backward", "all_gather"),
                   ("backward", "reduce_scatter")}
    assert calls["n"] == 1  # one forward per step: no recompute


def test_bf16_tracks_the_bf16_reference_and_halves_fsdp_gathers() -> None:
    ref = losses("", steps=20, precision="bf16")
    fp32 = losses("", steps=20)
    got, par = train("dp=2", steps=20, fsdp=True, precision="bf16")
    gathered = sum(r.bytes for r in par.schedule() if r.op.value == "all_gather")
    dtypes = {p.dtype for p in par.model.parameters()}
    par.close()
    _, par32 = train("dp=2", steps=1, fsdp=True)
    gathered32 = sum(r.bytes for r in par32.schedule() if r.op.value == "all_gather")
    reduced = {r.dtype for r in par32.schedule() if r.op.value == "reduce_scatter"}
    par32.close()
    # bf16 rounds each matmul to 8 mantissa bits; shards sum in another order, so the
    # curves agree to a few bf16 ulps of the loss, not to fp32's 1e-5
    assert got == pytest.approx(ref, rel=2e-3)
    assert ref != pytest.approx(fp32, rel=1e-6)  # bf16 did change the compute
    assert dtypes == {torch.float32}  # fp32 master parameters
    assert gathered * 2 == gathered32 and reduced == {"float32"}


def test_values_shows_every_rank_and_shard_splits_the_batch() -> None:
    par = lowering.parallelize(TinyLM(), "dp=2")
    x, _ = batch(0)
    xs = par.shard(x)
    vals = par.values(xs)
    par.close()
    assert len(vals) == 2 and torch.equal(vals[0], x[:4]) and torch.equal(vals[1], x[4:])


def test_from_local_takes_each_ranks_rows() -> None:
    ref = losses("", steps=1)
    torch.manual_seed(0)
    par = lowering.parallelize(TinyLM(), "dp=2")
    x, y = batch(0)
    from lowering._torch import rank_map
    xl = rank_map(lambda r: x[4 * r: 4 * r + 4])
    yl = rank_map(lambda r: y[4 * r: 4 * r + 4])
    logits = par.model(par.from_local(xl)).float()
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), par.from_local(yl).reshape(-1))
    got = loss.item()
    par.close()
    assert got == pytest.approx(ref[0], rel=1e-6)


def test_a_buffer_updated_in_place_is_each_simulated_ranks_own() -> None:
    """BatchNorm's running statistics on dp=2 in one process: each rank updates its own
    copy once a step (one shared tensor got the momentum once per simulated rank), and
    equal the single device's (DTensor gathers the batch for the batch statistics)."""
    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))

    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = net()
    for _ in range(2):
        ref(x)
    par = lowering.parallelize(net(), "dp=2")
    for _ in range(2):
        par.model(par.shard(x))
    means = par.values(par.model[1].running_mean)
    par.close()
    assert len(means) == 2 and all(torch.allclose(m, ref[1].running_mean, atol=1e-6)
                                   for m in means)


# -- checkpoints ----------------------------------------------------------------------------
def test_same_layout_resume_is_bit_exact(tmp_path: Path) -> None:
    full = losses("dp=2,tp=2", steps=8)
    first = losses("dp=2,tp=2", steps=3, checkpoint=str(tmp_path), save_every=3)
    rest = losses("dp=2,tp=2", steps=8, checkpoint=str(tmp_path), resume=True)
    assert first + rest == full  # bit-exact


class _Dropout(TinyLM):
    """TinyLM with dropout on its hidden state: its loss depends on the generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = h + F.dropout(self.down(F.gelu(self.up(h))), p=0.3, training=True)
        return self.head(h)


def test_a_simulated_resume_restores_every_ranks_generator(tmp_path: Path) -> None:
    def run(steps: int, **kw: object) -> list[float]:
        torch.manual_seed(0)
        return losses("dp=2", steps=steps, model=_Dropout(), **kw)

    full = run(6)
    first = run(3, checkpoint=str(tmp_path), save_every=3)
    rest = run(6, checkpoint=str(tmp_path), resume=True)
    assert first == full[:3]
    assert rest == full[3:]  # bit-exact: each simulated rank's dropout masks continue


@pytest.mark.parametrize("saved,loaded", [
    (dict(mesh="dp=2,tp=2"), dict(mesh="tp=4")),
    (dict(mesh="dp=4", fsdp=True), dict(mesh="dp=2,tp=2")),
    (dict(mesh="dp=2", fsdp=True, precision="bf16"), dict(mesh="tp=2", precision="bf16")),
])
def test_a_checkpoint_reshards_onto_another_layout(tmp_path: Path, saved: dict,
                                                   loaded: dict) -> None:
    new = {k: v for k, v in loaded.items() if k != "mesh"}
    full = losses(loaded["mesh"], steps=6, **new)
    old = {k: v for k, v in saved.items() if k != "mesh"}
    losses(saved["mesh"], steps=3, checkpoint=str(tmp_path), save_every=3, **old)
    rest = losses(loaded["mesh"], steps=6, checkpoint=str(tmp_path), resume=True, **new)
    tol = 2e-3 if new.get("precision") == "bf16" else 1e-5  # bf16: see the bf16 test
    assert rest == pytest.approx(full[3:], rel=tol, abs=1e-5)


def test_an_expert_parallel_checkpoint_loads_on_one_expert_shard(tmp_path: Path) -> None:
    def moe() -> GPT:
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, n_experts=4, top_k=2, capacity_factor=2.0))

    def steps(mesh: str, n: int, *, save: bool = False, load: bool = False) -> list[float]:
        par = lowering.parallelize(moe(), mesh)
        opt = torch.optim.AdamW(par.model.parameters(), lr=1e-2)
        start = par.load(tmp_path, optimizer=opt) if load else 0
        out = []
        for step in range(start, n):
            g = torch.Generator().manual_seed(step)
            x = torch.randint(0, 256, (4, 32), generator=g)
            logits = par.model(par.shard(x))
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), par.shard(x)[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        if save:
            par.save(tmp_path / "step-2", step=n, optimizer=opt)
        par.close()
        return out

    full = steps("", 4)
    steps("ep=2", 2, save=True)
    assert steps("", 4, load=True) == pytest.approx(full[2:], rel=1e-5, abs=1e-5)


# -- bad input ----------------------------------------------------------------------------
def test_loading_another_models_checkpoint_says_which_parameters_differ(tmp_path: Path) -> None:
    losses("dp=2", steps=1, checkpoint=str(tmp_path), save_every=1)
    par = lowering.parallelize(TinyLM(tied=False), "dp=2")
    try:
        with pytest.raises(sl.ShardingError, match=r"another model.*head\.weight"):
            par.load(tmp_path)
    finally:
        par.close()


def test_missing_and_partial_checkpoints_are_refused(tmp_path: Path) -> None:
    par = lowering.parallelize(TinyLM(), "dp=2")
    try:
        with pytest.raises(sl.ShardingError, match="no checkpoint at"):
            par.load(tmp_path / "nothing")
        (tmp_path / "ck" / "step-00003.partial").mkdir(parents=True)
        with pytest.raises(sl.ShardingError, match="no complete checkpoint.*did not finish"):
            par.load(tmp_path / "ck")
    finally:
        par.close()


def test_parallelize_twice_and_a_misspelt_precision_are_refused() -> None:
    with pytest.raises(sl.ShardingError, match="unknown precision 'bf61'.*bf16"):
        lowering.parallelize(TinyLM(), "dp=2", precision="bf61")
    par = lowering.parallelize(TinyLM(), "dp=2")
    try:
        with pytest.raises(sl.ShardingError, match=r"called twice.*\.close\(\)"):
            lowering.parallelize(TinyLM(), "dp=2")
    finally:
        par.close()
    lowering.parallelize(TinyLM(), "dp=2").close()  # after close() a new one is fine


@pytest.fixture(scope="module")
def pipeline_reference() -> list[float]:
    got, par = user_pipeline.train("", steps=5)
    par.close()
    return got


@pytest.mark.parametrize("mesh,kw", [
    ("pp=2", {}),
    ("pp=2,dp=2", {"fsdp": True, "microbatches": 4, "schedule": "gpipe"}),
    ("pp=2,dp=2,tp=2", {}),
    ("pp=2,sp=2", {"microbatches": 4}),
])
def test_a_user_loop_drives_a_pipeline_with_par_step(pipeline_reference: list[float],
                                                     mesh: str, kw: dict) -> None:
    got, par = user_pipeline.train(mesh, steps=5, **kw)
    par.close()
    assert got == pytest.approx(pipeline_reference, rel=1e-5, abs=1e-5)


def test_each_pipeline_rank_records_its_own_stage() -> None:
    _, par = user_pipeline.train("pp=2,dp=2", steps=1)
    first, last = par.schedule(0), par.schedule(2)  # global rank = stage * 2 + local rank
    par.close()
    ops = lambda recs, axis: [r.op.value for r in recs if r.axis == axis]  # noqa: E731
    # 1F1B, 2 microbatches: the first stage sends both activations, then receives both
    # gradients; the last receives one, sends its gradient back, then the next
    assert ops(first, "pp")[:4] == ["send", "send", "recv", "recv"]
    assert ops(last, "pp")[:4] == ["recv", "send", "recv", "send"]
    for recs, own, other in ((first, {"0", "1"}, {"2", "3"}), (last, {"2", "3"}, {"0", "1"})):
        reduced = {r.site.split(".")[1] for r in recs
                   if r.axis == "dp" and r.site.startswith("blocks.")}
        assert reduced == own, "a stage reduces the gradients of its own layers only"
        assert not reduced & other
        # the tied embedding/head: reduced over dp, then summed over pp, on both stages
        assert [r.op.value for r in recs if r.site.startswith("emb.weight")] == \
            ["all_reduce", "all_reduce"]
    with pytest.raises(sl.ShardingError, match="own schedule only|ranks are 0..3"):
        par.schedule(4)


@pytest.mark.parametrize("saved,loaded", [(("dp=4", {"fsdp": True}), "pp=2,dp=2"),
                                          (("pp=2,dp=2", {}), "dp=4")])
def test_a_checkpoint_reshards_onto_and_off_a_pipeline(tmp_path: Path, saved: tuple,
                                                     loaded: str) -> None:
    ref, par = user_pipeline.train("", steps=5)
    par.close()
    _, par = user_pipeline.train(saved[0], steps=3, save=str(tmp_path / "c"), save_at=3,
                                 **saved[1])
    par.close()
    got, par = user_pipeline.train(loaded, steps=5, load=str(tmp_path / "c"))
    par.close()
    assert got == pytest.approx(ref[3:], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name,mesh", [("llama", "pp=2,tp=2"), ("mixtral", "pp=2,ep=2")])
def test_a_hugging_face_model_trains_through_par_step_on_a_pipeline(name: str, mesh: str) -> None:
    import models
    from tests.hf_models import TINY
    source, overrides = TINY[name]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    curves = []
    for m in ("", mesh):
        torch.manual_seed(0)
        par = lowering.parallelize(models.hf.load(source, **overrides), m or None)
        opt = torch.optim.AdamW(par.model.parameters(), lr=1e-3)
        curve = []
        for step in range(3):
            x = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(step))
            curve.append(par.step(x[:, :-1], x[:, 1:], loss_fn).item())
            opt.step()
            opt.zero_grad()
        par.close()
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], rel=1e-5, abs=1e-5)


def test_a_pipeline_refuses_a_plain_forward_and_a_batch_it_cannot_split() -> None:
    torch.manual_seed(0)
    par = lowering.parallelize(user_pipeline.StackLM(), "pp=2,dp=2")
    try:
        x, y = user_pipeline.batch(0)
        with pytest.raises(sl.ShardingError, match=r"par\.step\(inputs, target, loss_fn\)"):
            par.model(x)
        with pytest.raises(sl.ShardingError, match="multiple of 4 rows"):
            par.step(x[:6], y[:6], user_pipeline.loss_fn)
        with pytest.raises(sl.ShardingError, match="global batch"):
            par.from_local(x)
    finally:
        par.close()


class _ResidualOutside(user_pipeline.StackLM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = h + block(h)  # a stage skipping a block would double h, not pass it on
        return self.head(h)


def test_a_stack_with_code_between_its_layers_is_refused_not_run_wrong() -> None:
    torch.manual_seed(0)
    par = lowering.parallelize(_ResidualOutside(), "pp=2")
    try:
        x, y = user_pipeline.batch(0)
        with pytest.raises(sl.ShardingError, match=r"layer 1's input is not what layer 0 "
                                                   r"returned.*residual inside"):
            par.step(x, y, user_pipeline.loss_fn)
    finally:
        par.close()


def test_a_forward_that_runs_another_models_layers_is_refused() -> None:
    """A model whose forward is bound to another model (a copy's captured method) never
    sees the activation a pipeline stage received: a ShardingError, not a raw traceback
    or a stage trained on dummy tokens."""
    torch.manual_seed(0)
    original = user_pipeline.StackLM()
    twin = copy.deepcopy(original)
    twin.forward = original.forward  # runs the original's layers
    par = lowering.parallelize(twin, "pp=2")
    try:
        x, y = user_pipeline.batch(0)
        with pytest.raises(sl.ShardingError, match="does not depend on the hidden state"):
            par.step(x, y, user_pipeline.loss_fn)
    finally:
        par.close()


def test_an_asynchronous_save_resumes_like_a_synchronous_one(tmp_path: Path) -> None:
    full = losses("dp=2", steps=5)
    first = losses("dp=2", steps=3, checkpoint=str(tmp_path), save_every=3, asynchronous=True)
    assert not list(tmp_path.glob("*.partial"))  # renamed into place once complete
    rest = losses("dp=2", steps=5, checkpoint=str(tmp_path), resume=True)
    assert first + rest == full


class _MixedLayer(torch.nn.Module):
    """A layer of the stack whose parameters have two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16).to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x).double()).float()


class _MixedStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_MixedLayer() for _ in range(2)])
        sl.axes(self.layers, "layers")
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _mixed_losses(mesh: str, fsdp: bool, frozen: bool = False) -> tuple[list[float], list[str]]:
    torch.manual_seed(0)
    model = _MixedStack()
    if frozen:  # fine-tuning: the second layer's float32 linear stays as it is
        model.layers[1].a.requires_grad_(False)
    par = lowering.parallelize(model, mesh, fsdp=fsdp)
    opt = torch.optim.SGD(par.model.parameters(), lr=0.1)
    out = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(par.model(par.shard(x, "batch", None)), par.shard(y, "batch"))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss.item()))
    sites = sorted({r.site for r in par.schedule() if r.axis == "dp" and r.op.value == "all_gather"})
    scattered = sorted({r.site for r in par.schedule() if r.op.value == "reduce_scatter"})
    if mesh:  # the formulas count what was recorded: units, dtypes, a frozen gather once
        wire = sum(r.wire_bytes for r in par.schedule() if r.axis == "dp" and r.site != "loss")
        assert analytic_volume(par.plan, par.model, batch=8, seq=1)["dp"].wire_bytes == wire
    par.close()
    return out, sites if not frozen else sites + ["|"] + scattered


def test_fsdp_gathers_a_layer_of_two_dtypes_as_one_unit_per_dtype() -> None:
    ref, _ = _mixed_losses("", False)
    got, sites = _mixed_losses("dp=2", True)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert sites == ["head", "layers.0 (float32)", "layers.0 (float64)", "layers.1 (float32)",
                     "layers.1 (float64)"]


def test_fsdp_gathers_a_frozen_parameter_alone_and_never_reduces_it() -> None:
    ref, _ = _mixed_losses("", False, frozen=True)
    got, sites = _mixed_losses("dp=2", True, frozen=True)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # layers.1's trainable parameters (all float64 now) are one unit; the frozen linear is
    # gathered on its own (again before its backward, which layers.0's gradient needs) and
    # has no gradient to reduce-scatter
    assert sites == ["head", "layers.0 (float32)", "layers.0 (float64)", "layers.1",
                     "layers.1.a", "|", "head", "layers.0 (float32)", "layers.0 (float64)",
                     "layers.1"]
