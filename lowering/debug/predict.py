"""The predicted step, shown: ``explain --device NAME`` prints what
:func:`lowering.plan.predict` makes of the dry trace (time, throughput, MFU, seconds per
mesh axis, the bubble, and what dominates)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lowering.plan import Device, Predicted, link_of
import shardlang as sl

__all__ = ["print_predicted", "seconds"]


def seconds(s: float) -> str:
    """Seconds in s/ms/us with three significant figures."""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def print_predicted(p: Predicted, dev: Device, mesh: sl.Mesh, console: Console, *,
                    precision: str, gpus_per_node: int | None = None) -> None:
    console.print(
        f"[bold]Predicted step on {dev.name}[/] ({precision}): {seconds(p.step_s)}, "
        f"{p.tokens_per_s:,.0f} tokens/s, {p.tflops_per_gpu:.4g} TFLOP/s per GPU, "
        f"MFU {p.mfu:.1%}"
        + (f" ({p.hardware_tflops_per_gpu:.4g} TFLOP/s executed, recomputed forwards "
           "included)" if p.hardware_tflops_per_gpu > p.tflops_per_gpu * (1 + 1e-9) else "")
        + (f", pipeline bubble {p.bubble:.1%}" if p.bubble else ""))
    t = Table(title="Seconds per mesh axis (the slowest pipeline stage's rank)",
              title_justify="left")
    for col in ("axis", "link", "in collectives", "exposed (not hidden by compute)"):
        t.add_column(col, justify="left" if col in ("axis", "link") else "right")
    t.add_row("compute", "", seconds(p.compute_s), seconds(p.compute_s))
    for axis, s in p.axis_s.items():
        _, _, link = link_of(mesh, axis, dev, gpus_per_node)
        t.add_row(axis, link, seconds(s), seconds(p.exposed_s.get(axis, 0.0)))
    console.print(t)
    console.print(f"why: {p.why}. Model: matmuls at {dev.matmul_efficiency:.0%} of the "
                  f"{precision} peak, fused attention at {dev.attention_efficiency:.0%}, other ops at {dev.hbm_efficiency:.0%} of HBM bandwidth; "
                  "gradient and FSDP traffic overlapped with compute, tp/sp/ep on the "
                  "critical path (lowering/plan/time.py)")
