"""One aten op's cost on a rank's own tensors, for the dry trace's compute counts
(:mod:`lowering.plan.time` times them): FLOPs by torch's own formulas, bytes of the rest."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter as _flops

from lowering._torch import ATTENTION_OPS, CPU_FLASH, CPU_FLASH_BACKWARD, tree_leaves

__all__ = ["op_cost"]

_FACTORIES = {getattr(torch.ops.aten, n) for n in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
    "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like",
    "new_full", "scalar_tensor", "arange", "lift_fresh", "_local_scalar_dense")}


def _tensor_bytes(tree: object) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def op_cost(func: Any, args: tuple, kwargs: dict, out: object) -> tuple[int, int, str]:
    """One aten op's cost on this rank's tensors: ``(flops, bytes, attention)``.

    ``flops``: ``torch.utils.flop_counter``'s formula (matmuls, convolutions and fused
    attention; the causal mask is not discounted), the CPU fused attention counted like
    the CUDA one. ``bytes``: what an op without a FLOP formula reads and writes (its
    tensor inputs and outputs; 0 for a view and an allocation). ``attention``: ``""``, or
    ``"full"`` / ``"causal"`` for a fused attention kernel without / with a causal mask
    (a causal kernel skips the masked half of its blocks)."""
    def kind(causal: bool) -> str:
        return "causal" if causal else "full"

    if func is CPU_FLASH:
        q, k, v = args[:3]
        causal = bool(args[4] if len(args) > 4 else kwargs.get("is_causal", False))
        return _flops.sdpa_flop_count(q.shape, k.shape, v.shape), 0, kind(causal)
    if func is CPU_FLASH_BACKWARD:
        g, q, k, v = args[:4]
        causal = bool(args[7] if len(args) > 7 else kwargs.get("is_causal", False))
        return (_flops.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape), 0,
                kind(causal))
    formula = _flops.flop_registry.get(func._overloadpacket)
    if formula is not None:
        flops = int(formula(*args, **kwargs, out_val=out))
        if func not in ATTENTION_OPS:
            return flops, 0, ""
        causal = bool(kwargs.get("is_causal", args[4] if len(args) > 4
                                 and isinstance(args[4], bool) else False))
        return flops, 0, kind(causal)
    if func._overloadpacket in _FACTORIES:
        return 0, 0, ""  # allocations (and the optimizer's state, made once)
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return 0, 0, ""  # a view: no memory traffic
    return 0, _tensor_bytes((args, kwargs)) + _tensor_bytes(out), ""


