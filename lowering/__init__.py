"""lowering: specs -> placements -> plan -> schedule; dry, simulate and run modes; CLI.

Subpackages, imported one way only (cli -> debug -> run -> parallel -> plan -> schedule ->
_torch): :mod:`lowering.plan` (pure data), :mod:`lowering.schedule` (records and the
recorder), :mod:`lowering.parallel` (one module per mesh axis), :mod:`lowering.run`
(sessions, modes, training), :mod:`lowering.debug` (rank-local debugging).
"""

from lowering._torch import register_cpu_sdpa
from lowering.plan import Options, ParamPlan, PipelinePlan, Plan, Schedule, lower
from lowering.run.parallelize import Parallel, parallelize

register_cpu_sdpa()  # third-party models call F.scaled_dot_product_attention directly

__all__ = ["lower", "Plan", "ParamPlan", "PipelinePlan", "Options", "Schedule", "parallelize",
           "Parallel"]

