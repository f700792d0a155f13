"""Tensor parallelism: roles derived from logical axes alone, and the vocab-parallel loss.

A linear whose output dim maps to ``tp`` is column-parallel, one whose input dim maps to
``tp`` is row-parallel, an embedding whose vocab dim maps to ``tp`` is vocab-parallel.
The placements do the rest: DTensor keeps a column-parallel output sharded, makes a
row-parallel output ``Partial`` (summed by the next ``constrain``: Megatron's
all-reduce), and the model's one ``constrain`` per block input converts the backward
``Partial`` gradient once (Megatron's other all-reduce).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import shardlang as sl
from lowering._torch import loss_parallel

__all__ = ["Role", "tp_role", "next_token_loss"]


class Role(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column-parallel"
    ROW = "row-parallel"
    VOCAB = "vocab-parallel"
    SHARDED = "sharded"


def tp_role(owner: nn.Module, spec: sl.P, ndim: int) -> Role:
    """The tensor-parallel role of a parameter of ``owner`` with this spec."""
    if "tp" not in spec.mesh_axes:
        return Role.REPLICATED if not spec.mesh_axes else Role.SHARDED
    tp_dim = spec.dim_of("tp")
    if isinstance(owner, nn.Embedding):
        return Role.VOCAB if tp_dim == 0 else Role.SHARDED
    if isinstance(owner, nn.Linear):
        if ndim == 1 or tp_dim == 0:
            return Role.COLUMN
        return Role.ROW
    return Role.SHARDED


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens; vocab-parallel when the vocab dim is sharded.

    The sum is taken locally and divided by the global token count, so the result is
    exact on any mesh.
    """
    n_tokens = targets.numel()
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten(0, 1)
    vocab_sharded = isinstance(logits, DTensor) and any(
        isinstance(p, Shard) and p.dim == logits.dim() - 1 for p in logits.placements
    )
    if vocab_sharded:
        with loss_parallel():
            total = F.cross_entropy(flat_logits, flat_targets, reduction="sum")
    else:
        total = F.cross_entropy(flat_logits, flat_targets, reduction="sum")
    return total / n_tokens
