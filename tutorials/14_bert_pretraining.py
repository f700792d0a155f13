"""Lesson 14: BERT pretraining: a masked-LM loss, not next-token.

Nothing in shardlang assumes next-token prediction. Here the Hugging Face BERT
architecture (tiny: 2 layers, width 64) learns to fill in masked bytes of a text file:
15% of the positions are replaced by a [MASK] id, and the loss is cross-entropy on those
positions only (``ignore_index=-100`` everywhere else), the way BERT was trained. Under
tp the vocabulary is sharded, so the loss runs vocab-parallel (no gathered logits) and
its mean divides by the number of masked positions over the whole batch.

You will see: (a) the masked-LM loss on one device and on dp=2 x tp=2, equal step by
step; (b) how many positions each step scores, and how a dp rank's share differs.

Run it:  python tutorials/14_bert_pretraining.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import lowering
import models.hf
from models.datasets import ByteText

TEXT = Path(__file__).resolve().parents[1] / "README.md"
VOCAB, MASK = 260, 256   # 256 bytes, a [MASK] id, padded to a multiple of tp (as BERT pads)
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)  # no dropout: every layout sees one model
STEPS, BATCH, SEQ = 6, 8, 32


def masked(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = ByteText(TEXT).batch(step, BATCH, SEQ)       # (B, S) bytes
    g = torch.Generator().manual_seed(10_000 + step)
    pick = torch.rand(x.shape, generator=g) < 0.15      # the positions to predict
    labels = torch.where(pick, x, torch.full_like(x, -100))
    return torch.where(pick, torch.full_like(x, MASK), x), labels


def train(mesh: str) -> tuple[list[float], lowering.Parallel]:
    torch.manual_seed(0)
    par = lowering.parallelize(models.hf.load("bert-base", **TINY), mesh)
    opt = torch.optim.AdamW(par.model.parameters(), lr=3e-3)
    losses = []
    for step in range(STEPS):
        x, labels = masked(step)
        logits = par.model(par.shard(x))                 # (B, S, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), par.shard(labels).reshape(-1),
                               ignore_index=-100)        # mean over the masked positions
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, par


def main() -> None:
    ref, par = train("")
    par.close()
    got, par = train("dp=2,tp=2")
    print("(a) one device:         " + " ".join(f"{v:.5f}" for v in ref))
    print(f"(a) {par.mesh!r}:  " + " ".join(f"{v:.5f}" for v in got))
    same = all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got, ref))
    print(f"    equal to one device (1e-5): {same}")
    _, labels = masked(STEPS - 1)
    shares = [int((v != -100).sum()) for v in par.values(par.shard(labels))]
    print(f"(b) the last step scores {int((labels != -100).sum())} masked positions; the "
          f"ranks hold {shares} of them (dp ranks differ, tp ranks share)")
    par.close()


if __name__ == "__main__":
    main()
