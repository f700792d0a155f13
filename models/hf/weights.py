"""Weights from safetensors files, read by name (with :mod:`models.hf.plans`' sources for
parameters that module surgery moved)."""

from __future__ import annotations

import functools
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
        transposed = bool(src and src.transposed)
        rows = src.rows if src and src.rows else None
        shape = list(view.get_shape())
        shape = shape[::-1] if transposed else shape  # as the model holds it
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        want = [slice(*b.indices(n)[:2]) for b, n in zip(block, shape)] if block is not None \
            else [slice(0, n) for n in shape]
        if rows is not None:  # a part of a fused weight: rows of the file's (model-view) tensor
            want[0] = slice(rows[0] + want[0].start, rows[0] + want[0].stop)
        t = view[tuple(want[::-1] if transposed else want)]
        return t.t().contiguous() if transposed else t


def _read_as(file: str, key: str, src: Source | None, dtype: torch.dtype,
             block: tuple[slice, ...]) -> torch.Tensor:
    return read_block(file, key, src, block).to(dtype)


def load_weights(model: nn.Module, folder: str) -> list[str]:
    """Copy every parameter's values from the folder's safetensors files, by name; or,
    if the files lack some names, copy nothing and return those names. While
    :func:`shardlang.reading_later` (the model is built to be distributed) parameters are
    tagged with a reader of their blocks instead, so each rank reads only its shard."""
    where = _index(folder)
    moved = sources(model)
    base = getattr(model, "base_model_prefix", "")
    found, missing = [], []
    for name, p in model.named_parameters():  # a tied alias loads through its first name
        key = _key(name, moved.get(name), where, base)
        (missing.append(name) if key is None else found.append((p, where.get(key), key,
                                                                 moved.get(name))))
    if missing:
        return missing
    for p, file, key, src in found:
        if sl.reading_later():  # distributed: each rank reads its block when distributed
            sl.read_from(p, functools.partial(_read_as, file, key, src, p.dtype))
            continue
        with torch.no_grad():
            p.copy_(read_block(file, key, src).to(p.dtype))
    return []
