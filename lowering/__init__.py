"""lowering: specs -> placements -> plan -> schedule; dry, simulate and run modes; CLI."""

from lowering import _sdpa_cpu
from lowering.plan import Options, ParamPlan, Plan, lower

_sdpa_cpu.register()  # third-party models call F.scaled_dot_product_attention directly

__all__ = ["lower", "Plan", "ParamPlan", "Options"]
