"""Tensor-parallel roles, derived from a parameter's spec and the module that owns it.

A linear whose output dim maps to ``tp`` is column-parallel, one whose input dim maps to
``tp`` is row-parallel, an embedding whose vocab dim maps to ``tp`` is vocab-parallel.
Roles are descriptive (printed by ``explain``, used by the analytic formulas); the
placements alone decide what runs (:mod:`lowering.parallel.tensor`).
"""

from __future__ import annotations

import enum

from torch import nn

import shardlang as sl

__all__ = ["Role", "tp_role"]


class Role(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column-parallel"
    ROW = "row-parallel"
    VOCAB = "vocab-parallel"
    SHARDED = "sharded"


def tp_role(owner: nn.Module, spec: sl.P, ndim: int, mesh: sl.Mesh) -> Role:
    """The tensor-parallel role of a parameter of ``owner`` with this spec on ``mesh``."""
    split = [a for a in spec.mesh_axes if mesh.axis_size(a) > 1]
    if "tp" not in split:
        return Role.REPLICATED if not split else Role.SHARDED
    tp_dim = spec.dim_of("tp")
    if isinstance(owner, nn.Embedding):
        return Role.VOCAB if tp_dim == 0 else Role.SHARDED
    if isinstance(owner, nn.Linear):
        if ndim == 1 or tp_dim == 0:
            return Role.COLUMN
        return Role.ROW
    return Role.SHARDED
