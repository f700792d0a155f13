"""A nanoGPT-style decoder in global view, annotated once with logical axes.

Shapes in comments are global (unsharded): B batch, S seq, E embed, H heads, D head_dim,
V vocab. The same code runs on one device and on any mesh; only the rules change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import shardlang as sl
from models.moe import MoE

__all__ = ["GPTConfig", "GPT", "Block", "Attention", "MLP"]


@dataclass
class GPTConfig:
    vocab_size: int = 256   # byte-level: any text file trains without a tokenizer
    seq_len: int = 32       # long enough for the synthetic task, short enough for CPU
    n_layer: int = 4        # enough layers to show per-layer collectives repeat
    n_head: int = 4         # divisible by tp = 1, 2, 4
    n_embd: int = 64        # width; head_dim = n_embd / n_head = 16
    mlp_ratio: int = 4      # hidden = mlp_ratio * n_embd, as in GPT-2
    mlp_hidden: int | None = None  # overrides mlp_ratio (LLaMA-7B uses 11008)
    tie_weights: bool = True  # lm_head shares wte: both are (vocab, embed)
    gated: bool = False     # SwiGLU MLP (gate, up, down) as in LLaMA, instead of GELU
    n_experts: int = 0      # 0: dense MLPs; > 0: a mixture of this many GELU experts (moe.py)
    top_k: int = 2          # experts per token: 1 is Switch, 2 is GShard/Mixtral
    capacity_factor: float = 1.25  # slots per expert = ceil(cf*k*tokens/n_experts); Switch's 1.25
    moe_every: int = 2      # every 2nd block (1, 3, ...) is MoE, as in GShard and Switch
    aux_weight: float = 0.01  # Switch's load-balancing coefficient: balances, barely moves the loss

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or self.mlp_ratio * self.n_embd


def _linear(n_in: int, n_out: int, out_axis: str | None, in_axis: str | None) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    sl.axes(lin.weight, out_axis, in_axis)  # nn.Linear stores (out, in)
    return lin


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        e = cfg.n_embd
        # q, k, v are column-parallel (heads on their output dim), o is row-parallel.
        self.q = _linear(e, e, "heads", "embed")
        self.k = _linear(e, e, "heads", "embed")
        self.v = _linear(e, e, "heads", "embed")
        self.o = _linear(e, e, "embed", "heads")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, E = x.shape
        H = self.n_head
        q = self.q(x).view(B, S, H, E // H).transpose(1, 2)  # (B, H, S, D)
        k = self.k(x).view(B, S, H, E // H).transpose(1, 2)  # (B, H, S, D)
        v = self.v(x).view(B, S, H, E // H).transpose(1, 2)  # (B, H, S, D)
        y = sl.attention(q, k, v, causal=True)               # (B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, E)                # (B, S, E)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = _linear(cfg.n_embd, cfg.hidden, "mlp", "embed")    # column-parallel
        self.gate = _linear(cfg.n_embd, cfg.hidden, "mlp", "embed") if cfg.gated else None
        self.down = _linear(cfg.hidden, cfg.n_embd, "embed", "mlp")  # row-parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(F.gelu(self.up(x)))  # (B, S, E) -> (B, S, hidden) -> (B, S, E)
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU, same shapes


def _norm(e: int) -> nn.LayerNorm:
    ln = nn.LayerNorm(e)
    sl.axes(ln.weight, "embed")
    sl.axes(ln.bias, "embed")
    return ln


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln1, self.attn = _norm(cfg.n_embd), Attention(cfg)
        moe = cfg.n_experts > 0 and layer % cfg.moe_every == cfg.moe_every - 1
        self.ln2 = _norm(cfg.n_embd)
        self.mlp: nn.Module = MoE(
            embed=cfg.n_embd, hidden=cfg.hidden, n_experts=cfg.n_experts, top_k=cfg.top_k,
            capacity_factor=cfg.capacity_factor, aux_weight=cfg.aux_weight, layer=layer,
        ) if moe else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The residual stream and the norms live in the "norm_seq" region, the attention
        # and MLP inputs in the "seq" region. Both map to sp by default; mapping norm_seq
        # to tp as well is Megatron's sequence parallelism (all-gather in, reduce-scatter
        # out, instead of one all-reduce).
        res = ("batch", "norm_seq", "embed")
        act = ("batch", "seq", "embed")
        # One conversion point per block input: q, k and v share it (Megatron's "f").
        x = sl.constrain(x + sl.constrain(self.attn(sl.constrain(self.ln1(x), *act)), *res), *res)
        x = sl.constrain(x + sl.constrain(self.mlp(sl.constrain(self.ln2(x), *act)), *res), *res)
        return x


class GPT(nn.Module):
    """Token ids (B, S) -> logits (B, S, V)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        sl.axes(self.wte.weight, "vocab", "embed")
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        sl.axes(self.wpe.weight, None, "embed")  # positions are global: every rank keeps all
        self.blocks = sl.axes(nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)), "layers")
        self.ln_f = _norm(cfg.n_embd)
        self.lm_head = _linear(cfg.n_embd, cfg.vocab_size, "vocab", "embed")
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, S = idx.shape
        idx = sl.constrain(idx, "batch", "seq")
        pos = sl.positions(S, device=idx.device)  # (S,): 0..S-1, in the order the tokens are laid out
        tok = sl.constrain(self.wte(idx), "batch", "norm_seq", "embed")  # (B, S, E): vocab-parallel sum
        x = sl.constrain(tok + self.wpe(pos), "batch", "norm_seq", "embed")  # (B, S, E)
        for block in self.blocks:
            x = block(x)
        x = sl.constrain(self.ln_f(x), "batch", "seq", "embed")
        return self.lm_head(x)                                       # (B, S, V)
