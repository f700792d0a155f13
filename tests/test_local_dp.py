"""dp-only layouts run a batch-local forward on local tensors (lowering.parallel.local_dp).

After the first call of a kind (probed as DTensors), the forward sees plain local
tensors, yet the losses, the gradients and the recorded schedule are those of the DTensor
forward and of one device. A forward that couples rows (BatchNorm statistics, a batch
mean, dropout, an auxiliary loss) keeps running as DTensors, exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import lowering
import shardlang as sl
from tests.user_loop import VOCAB, TinyLM, batch, train

pytestmark = pytest.mark.timeout(300)


def _input_kinds(make: Callable[[], nn.Module], steps: int, mesh: str = "dp=2", **kw: object
                 ) -> tuple[list[bool], list[float], lowering.Parallel]:
    """Whether the MLP's first linear saw a DTensor input in each step, and the losses."""
    torch.manual_seed(0)  # the initial weights of train("", ...)'s own model
    model = make()
    seen: list[bool] = []
    up = model.up if isinstance(model, TinyLM) else model.lm.up
    handle = up.register_forward_pre_hook(
        lambda mod, args: seen.append(isinstance(args[0], DTensor)))
    got, par = train(mesh, steps=steps, model=model, **kw)
    handle.remove()
    return seen, got, par


@pytest.mark.parametrize("precision,fsdp", [("fp32", False), ("bf16", False), ("fp32", True),
                                            ("bf16", True)])
def test_after_the_first_step_a_dp_forward_runs_on_local_tensors(precision: str,
                                                                   fsdp: bool) -> None:
    ref, single = train("", steps=4, precision=precision)
    single.close()
    seen, got, par = _input_kinds(TinyLM, 4, precision=precision, fsdp=fsdp)
    try:
        assert seen == [True, False, False, False]  # probed as DTensors, then local
        assert got == pytest.approx(ref, rel=1e-5 if precision == "fp32" else 2e-2, abs=1e-5)
        # the parameters stay DTensors; their fp32 gradients are reduced in one bucket, or
        # (FSDP) every parameter gathered once per forward and reduce-scattered once
        assert all(isinstance(p, DTensor) for p in par.model.parameters())
        dp = [r for r in par.schedule() if r.axis == "dp" and r.site != "loss"]
        params = list(TinyLM().parameters())
        if fsdp:
            ops = [r.op.value for r in dp]
            # one per unit: up's and down's weight and bias together, emb (tied to the
            # head) and the root's pos alone
            assert ops.count("reduce_scatter") == 4 and len(params) == 6
            assert ops.count("all_gather") >= 4
        else:
            assert [r.bytes for r in dp] == [sum(p.numel() * 4 for p in params)]
    finally:
        par.close()


@pytest.mark.parametrize("fsdp", [False, True])
def test_the_local_steps_record_the_probed_steps_schedule(fsdp: bool) -> None:
    torch.manual_seed(0)
    par = lowering.parallelize(TinyLM(), "dp=2", fsdp=fsdp)
    opt = torch.optim.SGD(par.model.parameters(), lr=0.1)
    scheds = []
    for step in range(3):
        x, y = batch(step)
        logits = par.model(par.shard(x))
        F.cross_entropy(logits.reshape(-1, VOCAB), par.shard(y).reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        scheds.append([(r.phase, r.op, r.axis, r.shape, r.bytes, r.site) for r in par.schedule()])
    with torch.no_grad():  # an evaluation call is its own kind: probed, then local
        evals = [par.model(par.shard(batch(9)[0])) for _ in range(2)]
        kinds = [(type(e), e.placements) for e in evals]
        same = torch.equal(evals[0].full_tensor(), evals[1].full_tensor())
        verdicts = list(par.model._shardlang_local_dp.verdicts.values())
    par.close()
    assert scheds[0] == scheds[1] == scheds[2] and scheds[0]
    assert kinds == [(DTensor, (Shard(0),))] * 2 and same
    assert len(verdicts) == 2 and None not in verdicts  # the training and the eval kind


class _Coupled(nn.Module):
    """TinyLM with one op that needs other rows (or draws random numbers)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lm = TinyLM()
        self.norm = nn.BatchNorm1d(VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lm(x)
        if self.kind == "batchnorm":
            return self.norm(h.flatten(0, 1)).view(h.shape)
        if self.kind == "center":
            return h - h.mean(0, keepdim=True)
        if self.kind == "aux":
            sl.aux_loss(h.float().pow(2).mean())
            return h
        return F.dropout(h, 0.1, self.training)


@pytest.mark.parametrize("kind", ["batchnorm", "center", "aux", "dropout"])
def test_a_forward_that_couples_rows_keeps_running_as_dtensors(kind: str) -> None:
    seen, got, par = _input_kinds(lambda: _Coupled(kind), 3)
    st = par.model._shardlang_local_dp
    par.close()
    assert seen == [True, True, True]
    assert list(st.verdicts.values()) == [None]
    if kind in ("batchnorm", "center"):  # exact against one device
        torch.manual_seed(0)
        ref, single = train("", steps=3, model=_Coupled(kind))
        single.close()
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_an_aux_loss_reported_in_the_probe_reaches_the_collector() -> None:
    torch.manual_seed(0)
    par = lowering.parallelize(_Coupled("aux"), "dp=2")
    try:
        for _ in range(2):
            with sl.collecting() as c:
                par.model(par.shard(batch(0)[0]))
            assert len(c.aux) == 1
    finally:
        par.close()
