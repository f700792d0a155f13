"""One training loop for every mode: next-token cross-entropy, AdamW, recorded step.

The loop is the same for the single-device reference (no mesh), dry mode (meta
tensors, one traced step), simulate mode (every rank in this process) and run mode (one
rank per process); only the session differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import host_values, implicit_replication, rank_values
from lowering.context import DTensorContext
from lowering.data import distribute_model, sync_grads
from lowering.linear import LocalLinear
from lowering.plan import Plan
from lowering.runtime import Mode, Session
from lowering.schedule import Phase, Record, Recorder
from lowering.tensor import loss_scope, next_token_loss
from models.datasets import Batches

__all__ = ["TrainConfig", "TrainResult", "StepCallback", "train", "reference", "group_axes"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1
    batch: int = 8
    seq: int = 32
    lr: float = 3e-3          # AdamW; gpt-tiny learns the synthetic task in ~50 steps
    seed: int = 0             # model init and data
    keep_grads: bool = False  # keep step 0's full gradients (for --check)


@dataclass
class TrainResult:
    losses: list[list[float]] = field(default_factory=list)  # [step][rank]
    records: list[Record] = field(default_factory=list)      # step 0, in issue order
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per rank
    metrics: list[dict[str, object]] = field(default_factory=list)  # [step] name -> rank 0's value


def group_axes(sess: Session) -> dict[str, tuple[str, int]]:
    """Process-group name -> (mesh axis, group size), for the recorder."""
    dm = sess.dmesh
    if dm is None:
        return {}
    return {dm.get_group(a).group_name: (a, dm.size(i))
            for i, a in enumerate(dm.mesh_dim_names or ())}


def _values(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return rank_values(full.detach(), world)


def build_model(factory: Callable[[], nn.Module], seed: int, *, meta: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return factory()
    return factory()


StepCallback = Callable[[int, list[float], dict[str, object]], None]


def train(model: nn.Module, plan: Plan | None, sess: Session | None, data: Batches,
          cfg: TrainConfig, *, on_step: StepCallback | None = None) -> TrainResult:
    """Train ``model`` under ``plan`` in ``sess`` (both None: the single-device reference)."""
    dmesh = sess.dmesh if sess else None
    # run mode: this process holds one rank's values; simulate: every rank's
    world = sess.world if sess and sess.mode is Mode.SIMULATE else 1
    dry = sess is not None and sess.mode is Mode.DRY
    recorder = Recorder(group_axes(sess)) if sess else None
    ctx = None
    if plan is not None and dmesh is not None:
        distribute_model(model, plan, dmesh)
        ctx = DTensorContext(plan, dmesh, recorder)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=False)
    result = TrainResult()
    for step in range(cfg.steps):
        with host_values():
            idx, tgt = data.batch(step, cfg.batch, cfg.seq)
        if ctx is not None:  # load-balanced sequence sharding lays tokens out reordered
            with host_values():
                order = ctx.positions(idx.shape[1], None)
                idx, tgt = idx[:, order], tgt[:, order]
        if dry:
            idx, tgt = idx.to("meta"), tgt.to("meta")
        rec = recorder if step == 0 else None
        with _recording(rec), _active(ctx):
            if ctx is not None:
                idx = ctx.constrain(idx, ("batch", "seq"))
                tgt = ctx.constrain(tgt, ("batch", "seq"))
            with sl.collecting() as reported:
                logits = model(idx)
            with loss_scope(logits):
                with (rec.site("loss") if rec else _null()):
                    loss = next_token_loss(logits, tgt)
                    aux = reported.total_aux()
                    total = loss if aux is None else loss + aux
                total.backward()
            if plan is not None and dmesh is not None:
                sync_grads(model, plan, dmesh, rec)
        if step == 0 and cfg.keep_grads and not dry:
            result.grads = {n: _values(p.grad, world) for n, p in model.named_parameters()
                            if p.grad is not None}
        with _recording(rec), (rec.site("optimizer", Phase.OPTIMIZER) if rec else _null()):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not dry:
            result.losses.append([float(v) for v in _values(loss, world)])
            result.metrics.append({k: _values(v, world)[0].tolist()
                                   for k, v in reported.metrics.items()})
            if on_step:
                on_step(step, result.losses[-1], result.metrics[-1])
    if recorder is not None:
        result.records = recorder.records
    return result


def reference(factory: Callable[[], nn.Module], data: Batches, cfg: TrainConfig) -> TrainResult:
    """The single-device run every layout must match."""
    return train(build_model(factory, cfg.seed), None, None, data, cfg)


@contextlib.contextmanager
def _recording(rec: Recorder | None) -> Iterator[None]:
    if rec is None:
        yield
        return
    with rec.recording():
        yield


@contextlib.contextmanager
def _active(ctx: DTensorContext | None) -> Iterator[None]:
    if ctx is None:
        yield
        return
    with sl.activate(ctx), implicit_replication(), LocalLinear():
        yield


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield
