"""Lesson 11: your own training loop, unchanged, on any mesh.

``lowering.parallelize(model, mesh)`` distributes an annotated model in place and returns
a ``Parallel``. From then on the loop is plain PyTorch: your loss (here cross-entropy on
a copy task, written as you would on one GPU), your optimizer and scheduler, gradient
clipping (``par.clip_grad_norm_``: the norm over every mesh axis) and accumulation
(``par.no_sync()``). ``loss.backward()`` alone reduces the gradients: hooks pack them
into buckets (as DDP does) and all-reduce each bucket as soon as its last gradient is
ready, while the rest of the backward runs (this small model's gradients fit one bucket:
the schedule shows one dp all-reduce, site ``grads head.weight .. pos``).
The only new calls are ``par.shard(batch)`` (the global batch -> this rank's block) and,
to look inside, ``par.values(t)`` (every rank's local value) and ``par.explain()``.

The same file runs three ways:

    python tutorials/11_your_own_training_loop.py          # every rank in this process
    shardlang simulate tutorials/11_your_own_training_loop.py --mesh dp=2,tp=2
    shardlang run tutorials/11_your_own_training_loop.py --mesh dp=2,tp=2   # torchrun, 4 processes

You will see: (a) the loss of each step on one device and on dp=2 x tp=2, equal;
(b) what rank 0 and rank 1 hold of the batch; (c) the step's collectives; and, run with
plain python, (d) a pipeline (pp=2 x dp=2) in the same kind of loop. A pipeline's step
is not one forward and one backward: its schedule interleaves the microbatches' forwards
and backwards across the stages. So the loop hands the batch, its target and the loss to
``loss = par.step(x, y, loss_fn)`` and keeps the rest (clipping, optimizer, scheduler).
Each stage sends its activations on and receives their gradients back; the embedding,
which every stage holds, has its gradient summed over pp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lowering
import shardlang as sl
from lowering.run.parallelize import launcher_mesh

VOCAB, SEQ, WIDTH, STEPS = 64, 16, 32, 6


class TinyLM(nn.Module):
    """A model of your own: embedding, a learned position table on the top module, one
    MLP block, an untied head. Each parameter names its dims once."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        sl.axes(self.emb.weight, "vocab", "embed")
        self.pos = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)
        sl.axes(self.pos, "seq", "embed")
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        sl.axes(self.up.weight, "mlp", "embed"), sl.axes(self.up.bias, "mlp")
        sl.axes(self.down.weight, "embed", "mlp"), sl.axes(self.down.bias, "embed")
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]          # (B, S, E)
        h = h + self.down(F.gelu(self.up(h)))             # (B, S, E)
        return self.head(h)                                # (B, S, V)


class Block(nn.Module):
    """One MLP block, residual included: a pipeline cuts between blocks, so each block
    takes the hidden state and returns the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        sl.axes(self.up.weight, "mlp", "embed"), sl.axes(self.up.bias, "mlp")
        sl.axes(self.down.weight, "embed", "mlp"), sl.axes(self.down.bias, "embed")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(h)))


class StackLM(nn.Module):
    """For a pipeline: the blocks in a stack marked ``layers`` (where pp cuts it)."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        sl.axes(self.emb.weight, "vocab", "embed")
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        sl.axes(self.blocks, "layers")
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)      # not h = h + block(h): nothing may run between two layers
        return self.head(h)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def train_pipeline(mesh: str) -> tuple[list[float], lowering.Parallel]:
    torch.manual_seed(0)
    par = lowering.parallelize(StackLM(), mesh)            # microbatches: pp by default
    opt = torch.optim.AdamW(par.model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = par.step(x, y, loss_fn)                     # every microbatch, both ways
        par.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, par


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    return x, (x * 3 + 1) % VOCAB                          # learn y = 3x + 1 mod 64


def train(mesh: str | None) -> tuple[list[float], lowering.Parallel]:
    torch.manual_seed(0)
    par = lowering.parallelize(TinyLM(), mesh)             # mesh=None: the launcher's
    opt = torch.optim.AdamW(par.model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):   # 2 accumulation steps
            with par.no_sync() if i == 0 else _nothing():
                logits = par.model(par.shard(xs))
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), par.shard(ys).reshape(-1))
                (loss / 2).backward()
            total += loss.item() / 2
        par.clip_grad_norm_(1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses, par


class _nothing:
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: object) -> None: ...


def main() -> None:
    launched = launcher_mesh()
    if launched is None:  # plain python: compare with one device first
        ref, par = train("")                               # "": one device
        par.close()
        print("(a) one device:   " + " ".join(f"{v:.5f}" for v in ref))
    losses, par = train(None if launched else "dp=2,tp=2")
    if par.rank == 0:
        print(f"(a) {par.mesh!r} [{par.mode}]: " + " ".join(f"{v:.5f}" for v in losses))
        if launched is None:
            same = all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(losses, ref))
            print(f"    equal to one device (1e-5): {same}")
    x, _ = batch(0)
    blocks = par.values(par.shard(x[:4]))
    if par.rank == 0:
        print(f"(b) the batch is {tuple(x[:4].shape)}; rank 0 holds rows "
              f"{tuple(blocks[0][:, 0].tolist())}" + (
                  f", rank 2 holds rows {tuple(blocks[2][:, 0].tolist())} (dp splits the "
                  "batch; tp ranks 0 and 1 hold the same rows)" if len(blocks) > 2 else ""))
        print("(c) the last step's collectives:")
    if par.rank == 0:
        par.explain()
    par.close()
    if launched is None:
        pipeline()


def pipeline() -> None:
    ref, par = train_pipeline("")
    par.close()
    got, par = train_pipeline("pp=2,dp=2")
    print("(d) one device:        " + " ".join(f"{v:.5f}" for v in ref))
    print(f"(d) {par.mesh!r}: " + " ".join(f"{v:.5f}" for v in got))
    same = all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got, ref))
    print(f"    equal to one device (1e-5): {same}")
    for rank in (0, 2):  # the first stage (ranks 0, 1) and the last (ranks 2, 3)
        pp = [f"{r.op.value} {r.site.split(' (')[1].rstrip(')')}" for r in par.schedule(rank)
              if r.axis == "pp" and r.op.value in ("send", "recv")]
        summed = [r.site for r in par.schedule(rank) if r.axis == "pp" and r.op.value == "all_reduce"]
        print(f"    rank {rank}: " + "; ".join(pp) + f"; summed over pp: {', '.join(summed)}")
    par.close()


if __name__ == "__main__":
    main()
