"""lowering: specs -> placements -> plan -> schedule; dry, simulate and run modes; CLI."""

from lowering.plan import Options, ParamPlan, Plan, lower

__all__ = ["lower", "Plan", "ParamPlan", "Options"]
