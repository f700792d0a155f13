"""Measure: ``shardlang bench`` (step time, tokens/s, TFLOP/s, memory, time per mesh
axis) beside the same model hand-parallelized with plain torch.distributed."""

from lowering.bench.baselines import Baseline, baseline_for, no_baseline_reason
from lowering.bench.runner import bench_layout, write_trace

__all__ = ["Baseline", "baseline_for", "no_baseline_reason", "bench_layout", "write_trace"]
