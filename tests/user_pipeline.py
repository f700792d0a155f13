"""A user's own pipelined model and loop: a layer stack marked ``layers``, a tied head,
their own loss (label-smoothed cross-entropy, not next-token), AdamW, a cosine schedule
and clipping, driven by ``par.step``. Run as a script (``python tests/user_pipeline.py
OUT.json`` or under ``shardlang run|simulate``) it writes its losses and each rank's
last-step schedule to OUT.json (under torchrun, OUT.json.rank<R> for rank R > 0)."""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import lowering
import shardlang as sl

VOCAB, SEQ, WIDTH, LAYERS = 64, 16, 32, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        sl.axes(self.norm.weight, "embed")
        sl.axes(self.norm.bias, "embed")
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        sl.axes(self.up.weight, "mlp", "embed")
        sl.axes(self.up.bias, "mlp")
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        sl.axes(self.down.weight, "embed", "mlp")
        sl.axes(self.down.bias, "embed")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class StackLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        sl.axes(self.emb.weight, "vocab", "embed")
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        sl.axes(self.blocks, "layers")
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied: held by the first and the last stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), target.reshape(-1),
                           label_smoothing=0.1)


def batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return x, (x * 5 + 3) % VOCAB


def train(mesh: str | None = "", *, steps: int = 5, fsdp: bool = False,
          microbatches: int | None = None, schedule: str | None = None,
          save: str | None = None, save_at: int = 0, load: str | None = None
          ) -> tuple[list[float], lowering.Parallel]:
    """Losses of steps ``start..steps-1`` (``start``: 0, or the step ``load`` saved)."""
    torch.manual_seed(0)
    par = lowering.parallelize(StackLM(), mesh or None, fsdp=fsdp, schedule=schedule,
                               microbatches=microbatches)
    opt = torch.optim.AdamW(par.model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    start = par.load(load, optimizer=opt, scheduler=sched) if load else 0
    losses = []
    for step in range(start, steps):
        x, y = batch(step)
        loss = par.step(x, y, loss_fn)
        par.clip_grad_norm_(0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if save and step + 1 == save_at:
            par.save(save, step=step + 1, optimizer=opt, scheduler=sched)
    return losses, par


def schedule_rows(par: lowering.Parallel, rank: int) -> list[list]:
    return [[r.phase.value, r.op.value, r.axis, list(r.shape), r.bytes, r.site]
            for r in par.schedule(rank)]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--save", help="write a checkpoint here after step --save-at")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--load", help="resume from this checkpoint (saved on any layout)")
    p.add_argument("--schedule")
    p.add_argument("--microbatches", type=int)
    a = p.parse_args()
    losses, par = train(None, steps=a.steps, fsdp=a.fsdp, save=a.save, save_at=a.save_at,
                        load=a.load, schedule=a.schedule, microbatches=a.microbatches)
    ranks = range(par.mesh.size) if par.mode == "simulate" else [par.rank]
    out = {"losses": losses, "mode": par.mode,
           "schedules": {str(r): schedule_rows(par, r) for r in ranks}}
    with open(a.out + (f".rank{par.rank}" if par.rank else ""), "w") as f:
        json.dump(out, f)
    par.close()
