"""Lesson 13: train GPT-2 (the Hugging Face architecture) on a text file, in bf16.

``models.hf.load("gpt2", ...)`` builds transformers' GPT-2 (tiny here: 2 layers, width
64) annotated from its plan; the training loop is the one of lesson 11, byte-level: the
next byte of any file (this lesson reads the repository's README), with
``precision="bf16"``: fp32 master weights and AdamW state, bf16 compute, fp32 gradient
reductions. The loss is computed in fp32 from the bf16 logits, as usual.

You will see: (a) the loss on one device and on dp=2 x tp=2, both in bf16, step by step,
falling; (b) how far they drift apart (bf16 rounds every matmul to 8 mantissa bits and the
shards sum in a different order, so the curves agree to ~1e-3, not fp32's 1e-5); (c) the
dtypes: parameters fp32, logits bf16, tensor-parallel all-reduces bf16.

Run it:  python tutorials/13_train_gpt2.py          (or: shardlang run ... --mesh dp=2,tp=2)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import lowering
import models.hf
from lowering.run.parallelize import launcher_mesh
from models.datasets import ByteText

TEXT = Path(__file__).resolve().parents[1] / "README.md"
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
STEPS, BATCH, SEQ = 8, 8, 32


def train(mesh: str | None) -> tuple[list[float], lowering.Parallel]:
    torch.manual_seed(0)
    model = models.hf.load("gpt2", **TINY)
    par = lowering.parallelize(model, mesh, precision="bf16")
    opt = torch.optim.AdamW(par.model.parameters(), lr=3e-3)
    data = ByteText(TEXT)
    losses = []
    for step in range(STEPS):
        x, y = data.batch(step, BATCH, SEQ)               # (B, S) bytes and the next ones
        logits = par.model(par.shard(x))                   # (B, S, 256) logits, bf16
        loss = F.cross_entropy(logits.float().reshape(-1, 256), par.shard(y).reshape(-1))
        loss.backward()
        par.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    par.last_logits_dtype = logits.dtype
    return losses, par


def main() -> None:
    launched = launcher_mesh()
    ref = None
    if launched is None:
        ref, par = train("")
        par.close()
        print("(a) one device, bf16:     " + " ".join(f"{v:.4f}" for v in ref))
    got, par = train(None if launched else "dp=2,tp=2")
    if par.rank == 0:
        print(f"(a) {par.mesh!r}, bf16: " + " ".join(f"{v:.4f}" for v in got))
        if ref is not None:
            drift = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
            print(f"(b) largest relative difference from one device: {drift:.1e}")
        tp = sorted({r.dtype for r in par.schedule() if r.axis == "tp" and r.bytes > 64})
        print(f"(c) parameters {sorted({str(p.dtype) for p in par.model.parameters()})}, "
              f"logits {par.last_logits_dtype}, tp all-reduces {tp}")
    par.close()


if __name__ == "__main__":
    main()
