"""Lesson 12: checkpoints that survive a failure and change layout.

``par.save(dir, step=..., optimizer=..., scheduler=...)`` writes a torch DCP checkpoint:
every parameter and optimizer tensor as *global* chunks, plus the step, the RNG and
anything you pass as ``extra``. ``par.load(dir, optimizer=...)`` reads it on whatever
layout you now run: each rank reads only the parts of the chunks its blocks need, so a
run saved on dp=2 x tp=2 continues on tp=4 (or FSDP on dp=4 continues on dp=2 x tp=2)
with the loss curve an uninterrupted run on the new layout would have had.

A save goes to ``DIR.partial`` and is renamed to ``DIR`` only when every rank has
written its part; ``par.load(parent)`` takes the newest complete checkpoint under a
folder, so a save cut short by a crash is never taken for a good one.

You will see: (a) 6 steps on tp=4 without a break; (b) 3 steps on dp=2 x tp=2, a save,
and 3 more on tp=4 after loading it: the same losses; (c) FSDP dp=4 -> dp=2 x tp=2;
(d) what a checkpoint folder holds; (e) the errors for a missing checkpoint, a save that
did not finish and a checkpoint of another model.

Run it:  python tutorials/12_checkpoint_and_reshard.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowering
import shardlang as sl

VOCAB, SEQ, WIDTH = 64, 16, 32


class TinyLM(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        sl.axes(self.emb.weight, "vocab", "embed")
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        sl.axes(self.up.weight, "mlp", "embed"), sl.axes(self.up.bias, "mlp")
        sl.axes(self.down.weight, "embed", "mlp"), sl.axes(self.down.bias, "embed")
        self.head = nn.Linear(width, VOCAB, bias=False)
        sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)                                    # (B, S, E)
        h = h + self.down(F.gelu(self.up(h)))              # (B, S, E)
        return self.head(h)                                # (B, S, V)


def run(mesh: str, steps: range, *, fsdp: bool = False, load: Path | None = None,
        save: Path | None = None) -> list[float]:
    torch.manual_seed(0)
    par = lowering.parallelize(TinyLM(), mesh, fsdp=fsdp)
    opt = torch.optim.AdamW(par.model.parameters(), lr=1e-2)
    if load is not None:
        start = par.load(load, optimizer=opt)             # -> the step it was saved at
        assert start == steps.start
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)            # the data position is the step
        x = torch.randint(0, VOCAB, (8, SEQ), generator=g)
        logits = par.model(par.shard(x))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), par.shard((x * 3 + 1) % VOCAB).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if save is not None:
        par.save(save / f"step-{steps.stop:05d}", step=steps.stop, optimizer=opt,
                 extra={"note": f"saved on {mesh}"})
    par.close()
    return losses


def show(label: str, losses: list[float]) -> None:
    print(f"{label}: " + " ".join(f"{v:.6f}" for v in losses))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp)
        show("(a) tp=4, 6 steps            ", run("tp=4", range(0, 6)))
        first = run("dp=2,tp=2", range(0, 3), save=ck / "a")
        rest = run("tp=4", range(3, 6), load=ck / "a")
        show("(b) dp=2,tp=2 then tp=4      ", first + rest)
        first = run("dp=4", range(0, 3), fsdp=True, save=ck / "c")
        show("(c) dp=2,tp=2, 6 steps       ", run("dp=2,tp=2", range(0, 6)))
        show("    FSDP dp=4 then dp=2,tp=2 ", first + run("dp=2,tp=2", range(3, 6), load=ck / "c"))
        done = ck / "a" / "step-00003"
        print(f"(d) {done.name}/ holds: " + ", ".join(sorted(p.name for p in done.iterdir())))
        print("(e) what goes wrong, and what it says:")
        (ck / "e" / "step-00009.partial").mkdir(parents=True)
        par = lowering.parallelize(TinyLM(width=48), "dp=2")
        for where in (ck / "nothing", ck / "e", ck / "a"):
            try:
                par.load(where)
            except sl.ShardingError as e:
                print(f"    {where.name}: {e}")
        par.close()


if __name__ == "__main__":
    main()
