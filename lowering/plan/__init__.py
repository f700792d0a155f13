"""Planning, pure data: spec -> placements -> roles -> :class:`Plan`; the pipeline split
and its action orders; analytic communication volumes; memory and time models. Never imports ``parallel`` or
``run``: nothing here executes a model on a mesh."""

from lowering.plan.analytic import AxisVolume, Term, analytic_volume, unexplained
from lowering.plan.buckets import BUCKET_BYTES, FIRST_BUCKET_BYTES, GradBucket, grad_buckets
from lowering.plan.memory import (ADAM_STEP_BYTES, CATEGORIES, Memory, human, in_flight_peak,
                                  state_bytes)
from lowering.plan.devices import DEVICES, Device, device
from lowering.plan.meta import KnownValues
from lowering.plan.lower import ParamPlan, PipelinePlan, Plan, lower
from lowering.plan.options import (Options, Precision, Recompute, Schedule, check_executed,
                                   check_options, given, option_fields)
from lowering.plan.pipeline import (BOUNDARY_AXES, Action, Kind, Pipe, Slot, actions, bubble_of,
                                    bubble_theory, check_pipe, describe_pipe, gantt_rows,
                                    hidden_key, layer_stack, microbatch_rows, timeline)
from lowering.plan.placements import contiguous_stride, describe, fsdp_dim, placements, tensor_axes
from lowering.plan.roles import Role, tp_role
from lowering.plan.shapes import ShapeTrace, check_activations, sdpa_as_attention
from lowering.plan.recompute import (REPEATED_AXES, StackCost, recomputed_bytes, recomputes,
                                      recomputed_compute, recomputed_records)
from lowering.plan.units import fsdp_units
from lowering.plan.time import Predicted, collective_seconds, compute_seconds, link_of, predict

__all__ = [
    "Plan", "ParamPlan", "PipelinePlan", "lower", "Options", "Precision", "Recompute", "Schedule",
    "check_options", "check_executed",
    "given", "option_fields", "Role", "tp_role", "ShapeTrace", "check_activations", "sdpa_as_attention",
    "Pipe", "Action", "Kind", "Slot", "actions", "timeline", "bubble_of", "bubble_theory",
    "gantt_rows", "check_pipe", "describe_pipe", "layer_stack", "hidden_key",
    "microbatch_rows", "BOUNDARY_AXES", "placements", "tensor_axes", "fsdp_dim", "describe",
    "contiguous_stride", "KnownValues", "GradBucket", "grad_buckets", "BUCKET_BYTES",
    "FIRST_BUCKET_BYTES", "AxisVolume", "Term", "analytic_volume", "unexplained",
    "Memory", "CATEGORIES", "ADAM_STEP_BYTES", "state_bytes", "in_flight_peak", "human",
    "Device", "DEVICES", "device", "Predicted", "predict", "collective_seconds",
    "compute_seconds", "link_of", "StackCost", "recomputed_compute", "recomputed_records",
    "recomputed_bytes", "recomputes", "REPEATED_AXES", "fsdp_units",
]
