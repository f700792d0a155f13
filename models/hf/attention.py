"""shardlang's attention for Hugging Face models (``attn_implementation="shardlang"``).

Registered with HF's ``AttentionInterface`` (and the same mask builder as ``"sdpa"``),
it hands HF attention to :func:`shardlang.attention`, so ``seq -> sp`` runs the ring
(load-balanced with ``--load-balance``; the positions HF's rotary embedding sees come
from :func:`shardlang.positions`) and heads split over ``tp`` attend locally. Key/value
heads stay grouped (GQA): the ring carries the fewer key/value heads.

Where HF passes an explicit mask (padding, a sliding window shorter than the sequence)
or a logit soft-cap, attention is computed in global view instead (scores, mask,
softmax): exact under dp and tp, but a sequence split over sp is gathered there.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import shardlang as sl

__all__ = ["NAME", "register", "shardlang_attention"]

NAME = "shardlang"


def shardlang_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        dropout: float = 0.0, scaling: float | None = None,
                        softcap: float | None = None, is_causal: bool | None = None,
                        **kwargs: object) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature: ``(b, h, s, d)`` in, ``(b, s, h, d)`` out."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise sl.ShardingError(
            f"{type(module).__name__} uses attention sinks, which shardlang's attention does "
            "not support; load the model with attn_implementation='eager'")
    if dropout and module.training:
        raise sl.ShardingError(
            f"{type(module).__name__} has attention dropout {dropout}: shardlang's attention "
            "has none (parity with one device needs it off); set the config's dropout to 0")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if attention_mask is None and not softcap and (q_len == kv_len or q_len == 1):
        out = sl.attention(query, key, value, causal=causal and q_len > 1, scale=scale)
    else:  # an explicit mask or a soft-cap: global view (sl.attention's mask path)
        out = sl.attention(query, key, value, causal=causal and q_len > 1, scale=scale,
                           mask=attention_mask, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="shardlang"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, shardlang_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
