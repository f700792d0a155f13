"""The first correctness oracle: every rank's loss and gradients against the
single-device model (fp32: rtol = atol = 1e-5 after one step, 1e-4 over the curve)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowering.run.train import TrainResult

__all__ = ["Parity", "check_parity"]


@dataclass
class Parity:
    ok: bool
    worst_param: str
    worst_rank: int
    worst_err: float
    loss_err: float
    lines: list[str]


def check_parity(got: TrainResult, ref: TrainResult, *, rtol: float = 1e-5,
                 atol: float = 1e-5, curve_tol: float = 1e-4) -> Parity:
    """Every rank's loss (each step) and step-0 gradients against the single-device run."""
    lines: list[str] = []
    ok, worst = True, ("", 0, 0.0)
    for name, per_rank in got.grads.items():
        want = ref.grads[name][0]
        for r, g in enumerate(per_rank):
            if g is None:  # a pipeline stage that does not hold this parameter
                continue
            err = (g - want).abs().max().item()
            if err > worst[2]:
                worst = (name, r, err)
            if not torch.allclose(g, want, rtol=rtol, atol=atol):
                ok = False
    loss_err = 0.0
    for step, (ls, (want,)) in enumerate(zip(got.losses, ref.losses)):
        for r, v in enumerate(ls):
            err = abs(v - want)
            loss_err = max(loss_err, err)
            tol = atol + rtol * abs(want) if step == 0 else curve_tol
            if err > tol:
                ok = False
                lines.append(f"step {step} rank {r}: loss {v:.6f} vs single device {want:.6f}")
    if worst[0]:
        lines.append(f"worst gradient error {worst[2]:.2e} in {worst[0]} on rank {worst[1]}; "
                     f"worst loss error {loss_err:.2e}")
    else:  # every gradient matched bit for bit (or there were none to compare)
        what = (f"gradients exact (0 error) in all {len(got.grads)} parameters"
                if got.grads else "no gradients compared")
        lines.append(f"{what}; worst loss error {loss_err:.2e}")
    return Parity(ok, worst[0], worst[1], worst[2], loss_err, lines)
