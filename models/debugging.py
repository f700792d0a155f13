"""Two small models that break under sharding on purpose, for the debugging lessons.

* ``rank_branch``: tensor-parallel rank 0 takes a branch the others do not (one extra
  ``sl.psum``). On one device it is harmless; on a mesh with tp > 1 the ranks of a tp
  group would wait on each other forever.
* ``uneven``: every tp rank sums a slice of a different length (a shape that depends on
  the rank, as an uneven last batch does). The collective is the same, the shapes are not.

Both are correct single-device models (token ids (B, S) -> logits (B, S, V)); only their
sharded runs go wrong, which ``shardlang explain --all-ranks`` predicts before launch and
``shardlang run`` (its collective check) stops with a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

import shardlang as sl

__all__ = ["RankBranch", "rank_branch", "uneven"]

ACT = ("batch", "seq", "embed")


class RankBranch(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, *, uneven: bool = False) -> None:
        super().__init__()
        self.uneven = uneven
        self.wte = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        sl.axes(self.wte.weight, None, "embed")
        sl.axes(self.up.weight, "mlp", "embed")      # column-parallel
        sl.axes(self.down.weight, "embed", "mlp")    # row-parallel
        sl.axes(self.head.weight, None, "embed")
        self.probe = sl.shard_map(self._probe, in_axes=(ACT,), out_axes=ACT)

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """Local view: a diagnostic that only rank 0 of tp runs (the bug)."""
        me = int(sl.axis_index("tp"))
        if self.uneven:  # every rank sums a slice whose length depends on its rank
            s = sl.psum(x[:, : x.shape[1] - me], "tp")  # (B, S - rank, E)
            return x + 0.0 * s.sum()
        if me == 0:      # only tp rank 0 communicates
            s = sl.psum(x.sum(), "tp")
            return x + 0.0 * s
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = sl.constrain(self.wte(sl.constrain(idx, "batch", "seq")), *ACT)  # (B, S, E)
        x = sl.constrain(x + self.down(torch.relu(self.up(x))), *ACT)        # (B, S, E)
        return self.head(self.probe(x))                                       # (B, S, V)


def rank_branch() -> nn.Module:
    return RankBranch()


def uneven() -> nn.Module:
    return RankBranch(uneven=True)
