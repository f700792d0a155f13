"""A LLaMA-style decoder written like a third-party library: plain torch, no shardlang.

Separate q/k/v/o and gate/up/down projections, RMSNorm, rotary positions and
``F.scaled_dot_product_attention`` called directly. Tests annotate it from outside
with ``sl.annotate`` and never edit this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels by a position-dependent angle. x: (B, H, S, D)."""
    B, H, S, D = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device).float() / D))
    ang = torch.arange(S, device=x.device).float()[:, None] * inv[None, :]   # (S, D/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        kv = dim // heads * self.kv_heads
        self.input_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv, bias=False)
        self.v_proj = nn.Linear(dim, kv, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, E = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(B, S, self.heads, -1).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.kv_heads, -1).transpose(1, 2)  # (B, KV, S, D)
        v = self.v_proj(h).view(B, S, self.kv_heads, -1).transpose(1, 2)
        if self.kv_heads != self.heads:  # grouped-query attention: share each K/V head
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)   # (B, H, S, D)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        a = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, S, E))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 32, heads: int = 4, hidden: int = 64,
                 layers: int = 2, kv_heads: int | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, hidden, kv_heads)
                                    for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def annotated(model: nn.Module | None = None) -> nn.Module:
    """The factory a user passes as tests.third_party_llama:annotated."""
    import shardlang as sl

    model = model or TinyLlama()
    sl.annotate(model, {
        "embed_tokens.weight": ("vocab", "embed"),
        "layers.*.[qkv]_proj.weight": ("heads", "embed"),
        "layers.*.o_proj.weight": ("embed", "heads"),
        "layers.*.gate_proj.weight": ("mlp", "embed"),
        "layers.*.up_proj.weight": ("mlp", "embed"),
        "layers.*.down_proj.weight": ("embed", "mlp"),
        "lm_head.weight": ("vocab", "embed"),
        "*norm.weight": ("embed",),
    })
    return model


def pipelined() -> nn.Module:
    """``annotated`` with its layer stack marked for pipeline parallelism, from outside."""
    import shardlang as sl

    return sl.annotate(annotated(), {"layers": ("layers",)})


def grouped_query() -> nn.Module:
    """``annotated`` with grouped-query attention: 4 query heads, 2 key/value heads."""
    return annotated(TinyLlama(kv_heads=2))


def plain() -> nn.Module:
    """The decoder with no annotation at all."""
    return TinyLlama()
