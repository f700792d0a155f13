"""Tiny configs of real Hugging Face architectures (hidden 64, 2 layers), as factories:
``shardlang simulate tests.hf_models:llama --mesh tp=2``. The same through the CLI is
``hf:llama-3-8b --config num_hidden_layers=2,hidden_size=64,...``."""

from __future__ import annotations

import functools

import torch
from transformers import FalconConfig, OPTConfig, OPTForCausalLM

import models.hf
import shardlang as sl

_SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=256)
_MOE = dict(_SMALL, num_experts_per_tok=2)

#: factory name -> (built-in, overrides)
TINY = {
    "llama": ("llama-3-8b", _SMALL),
    "mistral": ("mistral-7b", dict(_SMALL, sliding_window=None)),
    "qwen2": ("qwen2.5-7b", _SMALL),
    "qwen3": ("qwen3-8b", _SMALL),
    "mixtral": ("mixtral-8x7b", dict(_MOE, num_local_experts=4)),
    "qwen2_moe": ("qwen1.5-moe-a2.7b", dict(_MOE, num_experts=4, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64)),
    "qwen3_moe": ("qwen3-30b-a3b", dict(_MOE, num_experts=4, moe_intermediate_size=32)),
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256)),
    "bert": ("bert-base", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, vocab_size=128,
                               max_position_embeddings=256)),
}


def _factory(name: str):  # noqa: ANN202
    source, overrides = TINY[name]
    return functools.partial(models.hf.load, source, **overrides)


llama = _factory("llama")
mistral = _factory("mistral")
qwen2 = _factory("qwen2")
qwen3 = _factory("qwen3")
mixtral = _factory("mixtral")
qwen2_moe = _factory("qwen2_moe")
qwen3_moe = _factory("qwen3_moe")
gpt2 = _factory("gpt2")
bert = _factory("bert")


def _opt_config() -> OPTConfig:
    return OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                     vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=256,
                     dropout=0.0, attention_dropout=0.0)


def opt() -> torch.nn.Module:
    """An architecture with no tensor-parallel plan in transformers and none in shardlang."""
    return models.hf.load(_opt_config())


def opt_annotated() -> torch.nn.Module:
    """The same, annotated by hand as the error message says, then passed to load."""
    model = OPTForCausalLM(_opt_config())
    layer = "model.decoder.layers.*"
    act = ("batch", "seq", "embed")
    sl.annotate(model, {
        **{f"{layer}.self_attn.{n}_proj.weight": ("heads", "embed") for n in "qkv"},
        **{f"{layer}.self_attn.{n}_proj.bias": ("heads",) for n in "qkv"},
        f"{layer}.self_attn.out_proj.weight": ("embed", "heads"),
        f"{layer}.fc1.weight": ("mlp", "embed"), f"{layer}.fc1.bias": ("mlp",),
        f"{layer}.fc2.weight": ("embed", "mlp"),
        "model.decoder.embed_tokens.weight": ("vocab", "embed"),
        "model.decoder.layers": ("layers",),
    }, inputs={layer: act}, outputs={layer: act, f"{layer}.self_attn": act})
    return models.hf.load(model)


def falcon() -> torch.nn.Module:
    """An architecture whose attention calls ``F.scaled_dot_product_attention`` itself, with
    an explicit causal mask (Falcon always builds one), and has no tp plan."""
    return models.hf.load(FalconConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, vocab_size=128, hidden_dropout=0.0,
        attention_dropout=0.0))
