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
        Preset("gpt-7b",
               lambda: GPT(GPTConfig(vocab_size=32000, seq_len=2048, n_layer=32, n_head=32,
                                     n_embd=4096, mlp_hidden=11008, tie_weights=False,
                                     gated=True)),
               "LLaMA-7B sized decoder: 32 layers, width 4096, 32 heads, SwiGLU mlp 11008, "
               "vocab 32000, seq 2048 (dry mode only)",
               batch=8, seq=2048, dry_only=True),
    )
}
