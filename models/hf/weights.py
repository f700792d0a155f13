"""Weights from safetensors files, read by name (with :mod:`models.hf.plans`' sources for
parameters that module surgery moved)."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

import shardlang as sl
from models.hf.plans import Source, sources

__all__ = ["weight_files", "load_weights", "read_block"]


def weight_files(folder: str) -> list[str]:
    """The folder's ``*.safetensors`` files, sorted."""
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def _index(folder: str) -> dict[str, str]:
    """Checkpoint key -> the file holding it."""
    where: dict[str, str] = {}
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                where[k] = f
    return where


def _key(name: str, src: Source | None, where: dict[str, str], base: str) -> str | None:
    key = src.key if src else name
    for candidate in (key, key.removeprefix(f"{base}."), f"{base}.{key}" if base else key):
        if candidate in where:
            return candidate
    return None


def read_block(file: str, key: str, src: Source | None, block: tuple[slice, ...] | None = None
               ) -> torch.Tensor:
    """The values of one parameter (or of a block of it: ``block`` slices per dim of the
    parameter as the model holds it), reading only that block from the file."""
    with safe_open(file, framework="pt") as h:
        view = h.get_slice(key)
        shape = view.get_shape()
        transposed = bool(src and src.transposed)
        rows = src.rows if src and src.rows else None
        full = [slice(0, n) for n in (shape[::-1] if transposed else shape)]
        want = list(block) if block is not None else full
        if rows is not None:  # a part of a fused weight: rows of the model's view
            start = rows[0] + (want[0].start or 0)
            stop = rows[0] + (want[0].stop if want[0].stop is not None else rows[1] - rows[0])
            want[0] = slice(start, stop)
        if transposed:
            want = want[::-1]
        t = view[tuple(want)]
        return t.t().contiguous() if transposed else t


def load_weights(model: nn.Module, folder: str) -> None:
    """Copy every parameter's values from the folder's safetensors files (a parameter the
    files do not hold is a ShardingError naming it)."""
    where = _index(folder)
    moved = sources(model)
    base = getattr(model, "base_model_prefix", "")
    tied = {id(p) for n, p in model.named_parameters()}
    missing = []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = _key(name, moved.get(name), where, base)
        if key is None:
            if id(p) in tied and name not in dict(model.named_parameters()):
                continue  # a tied alias: its first name loads it
            missing.append(name)
            continue
        with torch.no_grad():
            p.copy_(read_block(where[key], key, moved.get(name)).to(p.dtype))
    if missing:
        raise sl.ShardingError(
            f"the safetensors files in {folder} hold no weights for {len(missing)} parameter(s) "
            f"of {type(model).__name__}, e.g. {', '.join(missing[:3])}; save the folder with "
            "model.save_pretrained(folder) (or load without weights from a config only)")
