"""The smallest model the CLI can train: token embedding, residual MLP blocks, head.

It sees one token at a time (no attention), so it shows data and tensor parallelism
with nothing else in the way. Token ids (B, S) -> logits (B, S, V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import shardlang as sl

__all__ = ["MLPConfig", "MLPModel"]


@dataclass
class MLPConfig:
    vocab_size: int = 256   # byte-level, like gpt-tiny
    seq_len: int = 32       # the CLI's default sequence length for this preset
    n_layer: int = 2        # two residual MLP blocks: two row-parallel all-reduces
    n_embd: int = 64        # width
    hidden: int = 256       # 4x width, divisible by tp up to 8


class MLPModel(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        sl.axes(self.wte.weight, None, "embed")
        self.ups = nn.ModuleList(nn.Linear(cfg.n_embd, cfg.hidden) for _ in range(cfg.n_layer))
        self.downs = nn.ModuleList(nn.Linear(cfg.hidden, cfg.n_embd) for _ in range(cfg.n_layer))
        for up, down in zip(self.ups, self.downs):
            sl.axes(up.weight, "mlp", "embed")    # column-parallel
            sl.axes(up.bias, "mlp")
            sl.axes(down.weight, "embed", "mlp")  # row-parallel
            sl.axes(down.bias, "embed")
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        sl.axes(self.head.weight, "vocab", "embed")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        act = ("batch", "seq", "embed")
        x = sl.constrain(self.wte(sl.constrain(idx, "batch", "seq")), *act)  # (B, S, E)
        for up, down in zip(self.ups, self.downs):
            x = sl.constrain(x + down(F.gelu(up(x))), *act)                   # (B, S, E)
        return self.head(x)                                                    # (B, S, V)
