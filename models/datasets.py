"""Training data: a synthetic task a tiny model learns on CPU, or bytes of any text file.

Every batch is a pure function of (seed, step), so every rank, the simulated ranks
and the single-device reference all see the same global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

import shardlang as sl

__all__ = ["Batches", "ArithmeticSequences", "ByteText"]


class Batches:
    """A source of (inputs, targets) token-id batches, both (batch, seq)."""

    vocab_size: int

    def batch(self, step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ArithmeticSequences(Batches):
    """Sequences ``a, a+d, a+2d, ...`` (mod vocab) with a random start ``a`` and a
    random step ``d`` in 1..3 per sequence.

    After two tokens the rest of a sequence is fully predictable. From ln(256) = 5.5,
    gpt-tiny (which can look back) reaches about 2.3 after 50 steps at the default
    learning rate and keeps falling; a model that sees one token at a time (mlp) can only
    learn ``next = x + d`` for an unknown d, so it cannot go below ln 3 = 1.1.
    """

    def __init__(self, vocab_size: int = 256, *, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seed = seed

    def batch(self, step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        start = torch.randint(0, self.vocab_size, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        t = torch.arange(seq + 1).unsqueeze(0)                       # (1, S+1)
        tokens = (start + stride * t) % self.vocab_size              # (B, S+1)
        return tokens[:, :-1], tokens[:, 1:]


class ByteText(Batches):
    """A byte-level language model over any file: random windows of seq+1 bytes."""

    vocab_size = 256

    def __init__(self, path: str | Path, *, seed: int = 0) -> None:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise sl.ShardingError(f"--data {path}: cannot read the file ({e.strerror})") from e
        if not data:
            raise sl.ShardingError(
                f"--data {path} is empty; give a text file with at least --seq + 2 bytes")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seed = seed
        self.path = str(path)

    def batch(self, step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data.numel() < seq + 2:
            raise sl.ShardingError(
                f"--data {self.path} has {self.data.numel()} bytes; a sequence of {seq} "
                f"needs at least {seq + 2}: use a longer file or a smaller --seq"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.data.numel() - seq - 1, (batch, 1), generator=g)
        window = self.data[starts + torch.arange(seq + 1)]           # (B, S+1)
        return window[:, :-1], window[:, 1:]
