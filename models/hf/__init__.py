"""Hugging Face ``transformers`` models as shardlang models (the optional extra ``.[hf]``).

:func:`load` builds a causal LM (or a masked LM, as BERT) from a built-in architecture
name (``"llama-3-8b"``: the published config, see :data:`BUILTIN`), a local folder with a
``config.json`` (and safetensors weights if present), a config object or a model you
built, and makes it follow the model contract:

- ``model(ids)`` maps token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)`` with
  the cache off and positions from :func:`shardlang.positions` (so load-balanced
  sequence sharding gives rotary the right positions); any other call (``generate``,
  keywords) is HF's own forward, unchanged;
- its parameters and activations are annotated from HF's own plans
  (:mod:`models.hf.plans`);
- HF's defaults work as they are: attention runs as ``"shardlang"`` (ring attention
  under ``sp``, :mod:`models.hf.attention`) where the model supports attention backends
  (otherwise its own ``F.scaled_dot_product_attention`` calls run as shardlang's
  attention), experts as ``"shardlang"`` (all-to-all expert parallelism,
  :mod:`models.hf.experts`), dropout 0 unless a config override sets it.

Example:
    >>> import torch, models.hf
    >>> m = models.hf.load("llama-3-8b", num_hidden_layers=2, hidden_size=64,
    ...                    intermediate_size=128, num_attention_heads=4,
    ...                    num_key_value_heads=2, vocab_size=128)
    >>> m(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 128])
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import types
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

import shardlang as sl
from models.hf import attention, experts
from models.hf.configs import BUILTIN, build_config, check_overrides, no_dropout
from models.hf.plans import annotate_hf, layer_stack_path, sources
from models.hf.weights import load_weights, weight_files

__all__ = ["load", "BUILTIN", "check_source", "is_large", "sources", "layer_stack_path",
           "is_masked_lm"]

transformers.logging.set_verbosity_error()  # no "weights not initialized" chatter per rank
logging.getLogger("transformers").setLevel(logging.ERROR)


def is_masked_lm(config: PretrainedConfig) -> bool:
    """A masked (bidirectional) LM, as BERT: trained to fill in masked tokens."""
    archs = getattr(config, "architectures", None) or []
    return any("MaskedLM" in a for a in archs) or config.model_type in (
        "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
        "xlm-roberta", "camembert", "modernbert")


def _model_class(config: PretrainedConfig) -> Any:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and ("CausalLM" in arch or "MaskedLM" in arch or "LMHead" in arch):
            return cls
    return transformers.AutoModelForMaskedLM if is_masked_lm(config) else (
        transformers.AutoModelForCausalLM)


def _config(source: str | PretrainedConfig, overrides: Mapping[str, object]) -> tuple[
        PretrainedConfig, str | None]:
    if isinstance(source, PretrainedConfig):
        check_overrides(source, overrides, "the config")
        for k, v in overrides.items():
            setattr(source, k, v)
        no_dropout(source, overrides)
        return source, None
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise sl.ShardingError(
                f"hf:{source} is a folder without a config.json; a Hugging Face model folder "
                "holds config.json (and *.safetensors weights)")
        config = AutoConfig.from_pretrained(source)
        check_overrides(config, overrides, f"hf:{source}")
        for k, v in overrides.items():
            setattr(config, k, v)
        no_dropout(config, overrides)
        return config, source
    return build_config(source, overrides), None


def _build(config: PretrainedConfig, folder: str | None = None) -> PreTrainedModel:
    """From the config (random weights), or with ``folder`` through HF's own loader."""
    cls = _model_class(config)
    attention.register()
    experts.register()

    def build(**kwargs: object) -> PreTrainedModel:
        cfg = copy.deepcopy(config)  # a failed try leaves its attention choice in the config
        if folder is not None:
            return cls.from_pretrained(folder, config=cfg, **kwargs)
        make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        return make(cfg, **kwargs)

    try:
        model = build(attn_implementation=attention.NAME)
    except (ValueError, ImportError, KeyError):  # no attention backends: keep its sdpa/eager
        model = build()
    return model


def _prepared(model: PreTrainedModel) -> PreTrainedModel:
    experts.prepare_experts(model)
    annotate_hf(model)
    return model


def _contract_forward(model: PreTrainedModel) -> None:
    """``model(ids)`` -> logits, cache off, positions from ``sl.positions``; any other call
    is HF's forward unchanged."""
    # the class's function, called on ``self``: a deep copy of the model then runs its own
    # weights (a bound method captured here would run the original's)
    hf_forward = type(model).forward
    takes = set(inspect.signature(hf_forward).parameters) - {"self"}

    def forward(self: nn.Module, input_ids: torch.Tensor | None = None, *args: object,
                **kwargs: object) -> object:
        if args or kwargs or input_ids is None:
            return hf_forward(self, input_ids, *args, **kwargs)
        extra: dict[str, object] = {}
        if "use_cache" in takes:
            extra["use_cache"] = False
        B, S = input_ids.shape
        if "position_ids" in takes:
            # positions in the order the tokens are laid out (load-balanced sp reorders them)
            extra["position_ids"] = sl.positions(S, device=input_ids.device).unsqueeze(0)  # (1, S)
            if "attention_mask" in takes:  # one sequence per row: not HF's packed-sequence
                # detection, which reordered positions would fool
                extra["attention_mask"] = torch.ones(B, S, dtype=torch.long,
                                                     device=input_ids.device)
        return hf_forward(self, input_ids=input_ids, **extra).logits

    model.forward = types.MethodType(forward, model)


def load(source: str | PretrainedConfig | PreTrainedModel, **overrides: object) -> nn.Module:
    """A Hugging Face model following the model contract, annotated from its own plans.

    Args:
        source: a built-in name (``"llama-3-8b"``, see :data:`BUILTIN`), a local folder
            with ``config.json`` (weights from its ``*.safetensors``, each rank reading
            only its own shard when distributed), a ``PretrainedConfig``, or a model you
            built (annotated in place).
        overrides: config fields to change (``num_hidden_layers=2``); an unknown field is
            a ShardingError that suggests the closest.
    """
    if isinstance(source, PreTrainedModel):
        model, folder = source, None
        check_overrides(model.config, overrides, type(model).__name__)
    else:
        config, folder = _config(source, overrides)
        model = _build(config)
    _prepared(model)
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if folder is not None and weight_files(folder) and not on_meta and load_weights(model, folder):
        # keys that need HF's own conversions (Mixtral's per-expert w1/w2/w3 into stacked
        # experts): HF's loader reads every tensor whole, on every rank
        model = _prepared(_build(config, folder))
    _contract_forward(model)
    return model


def check_source(source: str, overrides: Mapping[str, object]) -> None:
    """Raise the ShardingError :func:`load` would for a bad name, folder or override,
    without building anything (the CLI checks before it launches)."""
    _config(source, overrides)


def is_large(source: str, overrides: Mapping[str, object]) -> bool:
    """More than 1e9 parameters (about 12 h^2 per layer plus the embeddings): too large
    to train on a CPU here, so dry mode only."""
    config, _ = _config(source, overrides)
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    vocab = getattr(config, "vocab_size", 0)
    experts_n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 1) or 1
    return 12 * h * h * layers * max(1, experts_n) // 2 + vocab * h > 1_000_000_000
