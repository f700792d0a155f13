"""A user's own model and training loop, as a new user writes them: a root-level
parameter (a learned position table on the top module), a tied head, their own loss,
SGD with momentum, an LR scheduler, gradient clipping and accumulation. Run as a
script (``python tests/user_loop.py OUT.json [--steps N] ...`` or under ``shardlang
run|simulate``) it writes its losses to OUT.json."""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn

import lowering
import shardlang as sl

VOCAB, SEQ, WIDTH = 64, 16, 32


class TinyLM(nn.Module):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        sl.axes(self.emb.weight, "vocab", "embed")
        self.pos = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)  # owned by the root module
        sl.axes(self.pos, "seq", "embed")
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        sl.axes(self.up.weight, "mlp", "embed")
        sl.axes(self.up.bias, "mlp")
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        sl.axes(self.down.weight, "embed", "mlp")
        sl.axes(self.down.bias, "embed")
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        else:
            sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]          # (B, S, E)
        h = h + self.down(F.gelu(self.up(h)))             # (B, S, E)
        return self.head(h)                                # (B, S, V)


def batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)  # the data position is the step
    x = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return x, (x * 3 + 1) % VOCAB


def train(mesh: str | None = "", *, steps: int = 5, fsdp: bool = False, precision: str = "fp32",
          accumulate: int = 1, tied: bool = True, checkpoint: str | None = None,
          save_every: int = 0, resume: bool = False, kill_at: int = -1,
          asynchronous: bool = False, held: list | None = None,
          model: nn.Module | None = None) -> tuple[list[float], lowering.Parallel]:
    torch.manual_seed(0)
    par = lowering.parallelize(model or TinyLM(tied), mesh or None, fsdp=fsdp,
                               precision=precision)
    opt = torch.optim.SGD(par.model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    start = par.load(checkpoint, optimizer=opt, scheduler=sched) if resume else 0
    losses = []
    for step in range(start, steps):
        x, y = batch(step, 8 * accumulate)
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            last = i == accumulate - 1
            with (par.no_sync() if not last else _null()):
                logits = par.model(par.shard(xs)).float()
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), par.shard(ys).reshape(-1))
                (loss / accumulate).backward()
            total += loss.item() / accumulate
        par.clip_grad_norm_(1.0)
        if held is not None and step % 2 == 0:  # a user keeping this step's gradients
            for p in par.model.parameters():
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                held.append((g, g.clone()))
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
        if checkpoint and save_every and (step + 1) % save_every == 0:
            par.save(f"{checkpoint}/step-{step + 1:05d}", step=step + 1, optimizer=opt,
                     scheduler=sched, asynchronous=asynchronous)
        if step == kill_at and par.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dies mid-run
    return losses, par


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--hold-grads", action="store_true",
                   help="keep every even step's gradients (their local blocks) to the end")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when the checkpoint folder holds a checkpoint (a restart)")
    a = p.parse_args()
    found = a.checkpoint and os.path.isdir(a.checkpoint) and any(
        os.path.exists(os.path.join(a.checkpoint, d, "shardlang.pt"))
        for d in os.listdir(a.checkpoint))
    held: list | None = [] if a.hold_grads else None
    losses, par = train(None, steps=a.steps, fsdp=a.fsdp, checkpoint=a.checkpoint,
                        save_every=a.save_every, resume=a.resume or bool(a.auto_resume and found),
                        kill_at=a.kill_at, held=held)
    if par.rank == 0:
        out = {"losses": losses, "mode": par.mode, "mesh": str(par.mesh)}
        if held is not None:  # nothing of ours wrote into gradients a user still holds
            out["held_intact"] = len(held) > 0 and all(torch.equal(g, c) for g, c in held)
        with open(a.out, "w") as f:
            json.dump(out, f)
