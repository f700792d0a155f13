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


class _Output:
    """What a Hugging Face base model returns: an output object without logits."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def keys(self) -> list[str]:
        return ["last_hidden_state"]


class _Base(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 16, *, wrap: bool) -> None:
        super().__init__()
        self.wrap = wrap
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, dim, bias=False)
        sl.axes(self.up.weight, "mlp", "embed")

    def forward(self, idx: torch.Tensor) -> object:
        h = self.up(self.embed(idx))  # (B, S, dim): hidden states, no language-model head
        return _Output(h) if self.wrap else h


def output_object() -> nn.Module:
    """Returns an output object with no ``.logits`` (a base model, not a causal LM)."""
    return _Base(wrap=True)


def hidden_states() -> nn.Module:
    """Returns (B, S, 16) hidden states for a 256-token vocabulary."""
    return _Base(wrap=False)
