"""Annotated example models and the presets the CLI knows by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.gpt import GPT, GPTConfig
from models.mlp import MLPConfig, MLPModel

__all__ = ["Preset", "PRESETS", "GPT", "GPTConfig", "MLPModel", "MLPConfig"]


@dataclass(frozen=True)
class Preset:
    """A named model: its factory, default batch and seq, and whether it only fits dry mode."""

    name: str
    factory: Callable[[], nn.Module]
    description: str
    batch: int = 8
    seq: int = 32
    dry_only: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("mlp", lambda: MLPModel(MLPConfig()),
               "token embedding + 2 residual MLP blocks, width 64 (dp, tp)"),
        Preset("gpt-tiny", lambda: GPT(GPTConfig()),
               "nanoGPT decoder: 4 layers, width 64, 4 heads, seq 32, vocab 256"),
        # capacity factor n_experts/top_k = 2: one slot per local token in every expert,
        # and a token picks an expert at most once, so nothing drops on any layout
        Preset("gpt-bench",
               lambda: GPT(GPTConfig(seq_len=128, n_layer=4, n_head=8, n_embd=256,
                                     tie_weights=False)),
               "the benchmark GPT: 4 layers, width 256, 8 heads, separate q/k/v, untied head, "
               "seq 128, batch 8, vocab 256 (shardlang bench's reference model)",
               batch=8, seq=128),
        Preset("gpt-moe-tiny",
               lambda: GPT(GPTConfig(n_experts=4, top_k=2, capacity_factor=2.0, moe_every=2)),
               "gpt-tiny with a 4-expert top-2 MoE in every other block (1 and 3); capacity "
               "factor 2.0 = n_experts/top_k gives each expert one slot per local token, so "
               "no token drops on any layout"),
        Preset("gpt-7b",
               lambda: GPT(GPTConfig(vocab_size=32000, seq_len=2048, n_layer=32, n_head=32,
                                     n_embd=4096, mlp_hidden=11008, tie_weights=False,
                                     gated=True)),
               "LLaMA-7B sized decoder: 32 layers, width 4096, 32 heads, SwiGLU mlp 11008, "
               "vocab 32000, seq 2048 (dry mode only)",
               batch=8, seq=2048, dry_only=True),
    )
}
