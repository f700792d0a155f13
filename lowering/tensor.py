"""Tensor parallelism: roles derived from logical axes alone, and the vocab-parallel loss.

A linear whose output dim maps to ``tp`` is column-parallel, one whose input dim maps to
``tp`` is row-parallel, an embedding whose vocab dim maps to ``tp`` is vocab-parallel.
The placements do the rest: DTensor keeps a column-parallel output sharded, makes a
row-parallel output ``Partial`` (summed by the next ``constrain``: Megatron's
all-reduce), and the model's one ``constrain`` per block input converts the backward
``Partial`` gradient once (Megatron's other all-reduce).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import shardlang as sl
from lowering._torch import loss_parallel

if TYPE_CHECKING:
    from lowering.plan import Plan

__all__ = ["Role", "tp_role", "loss_scope", "loss_parallel_needed", "next_token_loss"]


class Role(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column-parallel"
    ROW = "row-parallel"
    VOCAB = "vocab-parallel"
    SHARDED = "sharded"


def tp_role(owner: nn.Module, spec: sl.P, ndim: int, mesh: sl.Mesh) -> Role:
    """The tensor-parallel role of a parameter of ``owner`` with this spec on ``mesh``."""
    split = [a for a in spec.mesh_axes if mesh.axis_size(a) > 1]
    if "tp" not in split:
        return Role.REPLICATED if not split else Role.SHARDED
    tp_dim = spec.dim_of("tp")
    if isinstance(owner, nn.Embedding):
        return Role.VOCAB if tp_dim == 0 else Role.SHARDED
    if isinstance(owner, nn.Linear):
        if ndim == 1 or tp_dim == 0:
            return Role.COLUMN
        return Role.ROW
    return Role.SHARDED


def loss_scope(logits: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where the loss and its backward run: torch's vocab-parallel cross-entropy
    (``loss_parallel``: local log-softmax with all-reduced max and sum, no gathered
    logits) when the vocab dim is sharded. Backward must run inside it too."""
    vocab_sharded = isinstance(logits, DTensor) and any(
        isinstance(p, Shard) and p.dim == logits.dim() - 1 for p in logits.placements
    )
    return loss_parallel() if vocab_sharded else contextlib.nullcontext()


def loss_parallel_needed(plan: Plan) -> contextlib.AbstractContextManager:
    """:func:`loss_scope` decided from the plan (before any logits exist): vocab-parallel
    when the rules shard the vocab over a mesh axis of size > 1."""
    spec = plan.rules.spec(("vocab",), where="the logits")
    sharded = any(plan.mesh.axis_size(a) > 1 for a in spec.mesh_axes)
    return loss_parallel() if sharded else contextlib.nullcontext()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens (call inside :func:`loss_scope`).

    The sum is taken locally and divided by the global token count, so the result is
    exact on any mesh.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(targets.shape):
        raise sl.ShardingError(
            f"the model returned logits of shape {tuple(logits.shape)} for token ids of shape "
            f"{tuple(targets.shape)}; a model must map (batch, seq) ids to (batch, seq, vocab)"
        )
    # (batch, vocab, seq): the class dim second, batch and seq left unflattened, so a
    # sequence-sharded tensor keeps plain Shard placements
    total = F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
    return total / targets.numel()
