"""Built-in Hugging Face architectures (hyperparameters from the published configs) and
config overrides (``--config key=value``), validated against the config's own fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig

import shardlang as sl
from shardlang.errors import closest

__all__ = ["BUILTIN", "build_config", "check_overrides", "no_dropout"]

_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192,
               rope_theta=500000.0, rms_norm_eps=1e-5, num_key_value_heads=8,
               tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
             tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)

#: name -> the published config's fields (model_type picks the transformers config class).
BUILTIN: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B, -70B; meta-llama/Llama-3.1-405B
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64},
    "llama-3-405b": {**_LLAMA3, "hidden_size": 16384, "intermediate_size": 53248,
                     "num_hidden_layers": 126, "num_attention_heads": 128,
                     "max_position_embeddings": 131072},
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768,
                       sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": {**_QWEN, "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "eos_token_id": 151643},
    # Qwen/Qwen3-8B
    "qwen3-8b": {**_QWEN, "model_type": "qwen3", "hidden_size": 4096,
                 "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960},
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {**_QWEN, "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "max_position_embeddings": 40960},
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": {**_QWEN, "model_type": "qwen2_moe", "hidden_size": 2048,
                          "intermediate_size": 5632, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "num_key_value_heads": 16,
                          "num_experts": 60, "num_experts_per_tok": 4,
                          "max_position_embeddings": 8192, "eos_token_id": 151643},
    # openai-community/gpt2, gpt2-xl
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768,
                 n_layer=12, n_head=12),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=1600,
                    n_layer=48, n_head=25),
    # google-bert/bert-base-uncased
    "bert-base": dict(model_type="bert", vocab_size=30522, hidden_size=768,
                      num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512),
}

_DROPOUTS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
             "classifier_dropout", "summary_first_dropout")


def _fields(config: Any) -> set[str]:
    return set(config.to_dict()) | set(getattr(config, "attribute_map", {}))


def check_overrides(config: Any, overrides: Mapping[str, object], what: str) -> None:
    """Every override must name a field of the config: suggest the closest otherwise."""
    fields = _fields(config)
    for key in overrides:
        if key not in fields:
            hint = closest(key, fields)
            near = f"; did you mean {hint!r}?" if hint else ""
            raise sl.ShardingError(
                f"--config {key}=...: {what} ({type(config).__name__}) has no field {key!r}"
                f"{near} (its fields include {', '.join(sorted(fields)[:12])}, ...)")


def build_config(name: str, overrides: Mapping[str, object]) -> Any:
    """The config of a built-in architecture with ``overrides`` applied. A smaller
    ``hidden_size`` or head count re-derives ``head_dim`` unless it is given too, and
    dropout is 0 unless given (training checks compare against one device)."""
    if name not in BUILTIN:
        hint = closest(name, BUILTIN)
        near = f"did you mean 'hf:{hint}'? " if hint else ""
        raise sl.ShardingError(
            f"unknown Hugging Face model 'hf:{name}': {near}built-ins are "
            f"{', '.join(BUILTIN)}; or give a folder with a config.json as hf:PATH")
    fields = dict(BUILTIN[name])
    model_type = fields.pop("model_type")
    probe = AutoConfig.for_model(model_type)
    check_overrides(probe, overrides, f"hf:{name}")
    fields.update(overrides)
    heads = fields.get("num_attention_heads")
    if "head_dim" in fields and "head_dim" not in overrides and isinstance(heads, int) and (
            "hidden_size" in overrides or "num_attention_heads" in overrides):
        fields["head_dim"] = fields["hidden_size"] // heads
    config = AutoConfig.for_model(model_type, **fields)
    no_dropout(config, overrides)
    return config


def no_dropout(config: Any, keep: Mapping[str, object]) -> None:
    """Dropout off (fields given in ``keep`` stay as given)."""
    for key in _DROPOUTS:
        if key not in keep and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
