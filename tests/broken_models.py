"""Models that are wrong under sharding on purpose, to prove --check catches it."""

from __future__ import annotations

import torch
from torch import nn

import shardlang as sl


class LocalMeanLM(nn.Module):
    """Scales activations by 1/(local batch size) inside shard_map: right on one device,
    wrong on dp=2 (each rank sees half the batch), so --check must fail."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        sl.axes(self.embed.weight, "vocab", "embed")
        sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        scale = sl.shard_map(lambda h: h * (8.0 / h.shape[0]),
                             in_axes=(("batch", "seq", "embed"),), out_axes=("batch", "seq", "embed"))
        return self.head(scale(x))


def local_mean_lm() -> nn.Module:
    return LocalMeanLM()
