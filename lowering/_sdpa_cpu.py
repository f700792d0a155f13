"""DTensor sharding strategies for the CPU attention kernel, which torch 2.13 lacks.

``F.scaled_dot_product_attention`` on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``;
DTensor registers strategies for the CUDA kernels only, so a third-party model that
calls SDPA directly would fail under any plan on CPU. Attention is independent per
batch row and per head, so we register what the CUDA flash kernel has: everything
replicated, heads (dim 1) sharded, or batch (dim 0) sharded — forward and backward.
This file is the one place these private DTensor APIs are imported.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import (
    expand_to_full_mesh_op_strategy,
    register_op_strategy,
)

__all__ = ["register"]

_aten = torch.ops.aten
_done = False


def _patterns(n: int) -> list[list[Placement | None]]:
    return [[Replicate()] * n, [Shard(1)] * n, [Shard(0)] * n]


def register() -> None:
    """Register the CPU SDPA strategies once per process."""
    global _done
    if _done:
        return
    _done = True

    @register_op_strategy(_aten._scaled_dot_product_flash_attention_for_cpu.default,
                          schema_info=RuntimeSchemaInfo(3))
    def _forward(op_schema: OpSchema) -> OpStrategy:
        # [output, logsumexp, q, k, v]
        mesh = op_schema.get_mesh_from_args()
        return expand_to_full_mesh_op_strategy(mesh, op_schema, _patterns(5), input_index=2)

    @register_op_strategy(_aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                          schema_info=RuntimeSchemaInfo(6))
    def _backward(op_schema: OpSchema) -> OpStrategy:
        # [grad_q, grad_k, grad_v, grad_out, q, k, v, out, logsumexp]
        mesh = op_schema.get_mesh_from_args(validate=False)
        return expand_to_full_mesh_op_strategy(mesh, op_schema, _patterns(9), input_index=3)
