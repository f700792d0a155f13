"""lowering: specs -> placements -> plan -> schedule; dry, simulate and run modes; CLI.

Subpackages, imported one way only (cli -> debug -> run -> parallel -> plan -> schedule ->
_torch): :mod:`lowering.plan` (pure data), :mod:`lowering.schedule` (records and the
recorder), :mod:`lowering.parallel` (one module per mesh axis), :mod:`lowering.run`
(sessions, modes, training), :mod:`lowering.debug` (rank-local debugging).
"""

from lowering._torch import register_cpu_sdpa
from lowering.plan import Options, ParamPlan, PipelinePlan, Plan, Schedule, lower

register_cpu_sdpa()  # third-party models call F.scaled_dot_product_attention directly

__all__ = ["lower", "Plan", "ParamPlan", "PipelinePlan", "Options", "Schedule", "parallelize",
           "Parallel"]


def __getattr__(name: str) -> object:
    """``lowering.parallelize`` and ``lowering.Parallel``, imported on first use (they
    bring the execution layers; planning alone does not need them)."""
    if name in ("parallelize", "Parallel"):
        from lowering.run import parallelize as module
        return getattr(module, name)
    raise AttributeError(f"module 'lowering' has no attribute {name!r}")
