"""Execution per mesh axis: :mod:`.data` (dp, FSDP), :mod:`.tensor` (tp), :mod:`.sequence`
(sp), :mod:`.expert` (ep), :mod:`.pipeline` and :mod:`.pipeline_step` (pp), each opening
with its forward/backward table; :mod:`.context` is the lowering context the DSL's calls
dispatch to (with :mod:`.shard_map` and :mod:`.collectives` for the local view), and
:mod:`.distribute` puts a model's parameters on the mesh."""

from lowering.parallel.context import DTensorContext
from lowering.parallel.distribute import distribute_model, read_whole_weights

__all__ = ["DTensorContext", "distribute_model", "read_whole_weights"]
