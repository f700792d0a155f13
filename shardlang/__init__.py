"""shardlang: a named-axis sharding DSL over PyTorch DTensor.

Model code names tensor dims with logical axes; a mesh and rules say how they are
split. This package is pure (no ``torch.distributed``): with no lowering active every
call has single-device semantics. ``lowering`` turns a model, mesh and rules into a plan.
"""

from shardlang.annotate import activation_axes, annotate, axes, logical_axes
from shardlang.context import Comm, LoweringContext, activate, active
from shardlang.errors import ShardingError, ShardingWarning
from shardlang.mesh import MESH_AXES, Mesh
from shardlang.metrics import Collected, aux_loss, collecting, metric
from shardlang.ops import (
    all_gather, all_to_all, attention, axis_index, constrain, positions, ppermute, psum,
    psum_scatter, shard_map,
)
from shardlang.rules import LOGICAL_AXES, Axes, Rules
from shardlang.spec import P
from shardlang.weights import read_from, read_later, reader_of, reading_later

__all__ = [
    "MESH_AXES", "LOGICAL_AXES", "Axes", "Mesh", "P", "Rules", "ShardingError", "ShardingWarning",
    "axes", "annotate", "logical_axes", "activation_axes", "constrain", "attention", "shard_map",
    "positions", "axis_index",
    "psum", "all_gather", "psum_scatter", "all_to_all", "ppermute",
    "Comm", "LoweringContext", "active", "activate",
    "aux_loss", "metric", "collecting", "Collected",
    "read_from", "reader_of", "reading_later", "read_later",
]
