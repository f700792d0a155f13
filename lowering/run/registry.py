"""Resolve a MODEL argument: a preset name or ``package.module:factory``."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import shardlang as sl
from lowering.parallel.tensor import logits_of
from lowering.plan import KnownValues
from models import PRESETS

__all__ = ["ModelRef", "resolve", "parse_config"]


@dataclass(frozen=True)
class ModelRef:
    name: str
    factory: Callable[[], nn.Module]
    batch: int = 8
    seq: int | None = None
    dry_only: bool = False

    def build(self, *, seed: int = 0, meta: bool = False, shards: bool = False) -> nn.Module:
        """The model (``meta``: on meta tensors; ``shards``: to be distributed, so a
        factory that can tags weights to be read per rank, see :mod:`shardlang.weights`)."""
        torch.manual_seed(seed)
        try:
            with torch.device("meta") if meta else contextlib.nullcontext(), (
                    sl.read_later() if shards else contextlib.nullcontext()):
                model = self.factory()
        except sl.ShardingError:
            raise
        except Exception as e:  # a user's factory: report it in one line, not a traceback
            raise sl.ShardingError(f"model factory {self.name} failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise sl.ShardingError(
                f"model factory {self.name} returned {type(model).__name__}; it must return "
                "an nn.Module mapping token ids (batch, seq) to logits (batch, seq, vocab)"
            )
        return model

    def default_seq(self, model: nn.Module) -> int:
        if self.seq is not None:
            return self.seq
        cfg = getattr(model, "config", None)
        for attr in ("seq_len", "block_size", "max_position_embeddings", "n_positions"):
            if isinstance(getattr(cfg, attr, None), int):
                return min(int(getattr(cfg, attr)), 32)
        return 32

    def vocab_size(self, model: nn.Module) -> int:
        """The model's vocabulary: from its config, else from one forward on meta tensors."""
        cfg = getattr(model, "config", None)
        if isinstance(getattr(cfg, "vocab_size", None), int):
            return int(cfg.vocab_size)
        probe = self.build(meta=True)
        try:
            with torch.no_grad(), KnownValues():
                out = probe(torch.zeros(1, 2, dtype=torch.long, device="meta"))
        except Exception as e:
            raise sl.ShardingError(
                f"cannot find the vocabulary size of {self.name}: give it a config.vocab_size, "
                f"or make it run on meta tensors ({type(e).__name__}: {e})"
            ) from e
        logits = logits_of(out, name=self.name)
        if logits.dim() != 3:
            raise sl.ShardingError(
                f"{self.name} must map token ids (batch, seq) to logits (batch, seq, vocab); "
                f"it returned a tensor of shape {tuple(logits.shape)}")
        return int(logits.shape[-1])


def parse_config(text: str) -> dict[str, object]:
    """``"num_hidden_layers=2,hidden_size=64"`` -> ``{"num_hidden_layers": 2, ...}``."""
    out: dict[str, object] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise sl.ShardingError(
                f"--config {text!r}: {item!r} is not KEY=VALUE; write e.g. "
                "--config num_hidden_layers=2,hidden_size=64")
        out[key.strip()] = _value(value)
    return out


def _value(text: str) -> object:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _hf(text: str, config: dict[str, object]) -> ModelRef:
    """``hf:NAME`` or ``hf:PATH``: a Hugging Face model through :func:`models.hf.load`."""
    try:
        # optional dependency: transformers is imported only for hf: models
        import models.hf as hf  # noqa: PLC0415
    except ImportError as e:
        raise sl.ShardingError(
            f"{text} needs Hugging Face transformers: pip install -e '.[hf]' ({e})") from e
    source = text[len("hf:"):]
    if not source:
        raise sl.ShardingError(
            f"{text!r}: name a built-in architecture ({', '.join(hf.BUILTIN)}) or a folder, "
            "e.g. hf:llama-3-8b or hf:./my-model")
    hf.check_source(source, config)  # bad names, folders and fields fail before a launch
    label = text + (f" --config {','.join(f'{k}={v}' for k, v in config.items())}"
                    if config else "")
    return ModelRef(label, functools.partial(hf.load, source, **config),
                    dry_only=hf.is_large(source, config))


def resolve(text: str, *, config: str | dict[str, object] = "") -> ModelRef:
    """A preset (``gpt-tiny``), an importable factory (``package.module:factory``) or a
    Hugging Face model (``hf:NAME`` / ``hf:PATH``, with ``config`` overrides)."""
    overrides = parse_config(config) if isinstance(config, str) else dict(config)
    if text.startswith("hf:"):
        return _hf(text, overrides)
    if overrides:
        raise sl.ShardingError(
            f"--config overrides the config of a Hugging Face model (hf:NAME or hf:PATH); "
            f"{text} is not one")
    if text in PRESETS:
        p = PRESETS[text]
        return ModelRef(p.name, p.factory, p.batch, p.seq, p.dry_only)
    if ":" not in text:
        raise sl.ShardingError(
            f"unknown model {text!r}; use a preset ({', '.join(PRESETS)}), "
            "package.module:factory, or hf:NAME / hf:PATH for a Hugging Face model"
        )
    mod_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `shardlang` finds your module the way `python -m` would
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise sl.ShardingError(f"cannot import {mod_name!r} for model {text!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise sl.ShardingError(f"{mod_name} has no callable {attr!r} (model {text!r})")
    return ModelRef(text, factory)
