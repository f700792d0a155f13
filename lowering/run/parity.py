"""The first correctness oracle: every rank's loss and gradients against the
single-device model.

fp32: rtol = atol = 1e-5 after one step, 1e-4 over the curve. bf16: the reference applies
the same casts, but bf16 keeps 8 significant bits, so a sum rounded at other points (a
sharded matmul, another reduction order, microbatches accumulated in fp32) differs from
it by ulps of its largest terms, and where terms cancel (a position table's gradient sums
the whole batch) that is a large part of the result. The bound is therefore the model's
own: a parameter's gradient may differ from the bf16 reference by at most
``BF16_GRAD_SPREAD`` times the bf16 reference's distance from the fp32 one, plus
``BF16_FLOOR`` of its largest entry; the loss by ``BF16_LOSS`` relative each step. A
missing or doubled reduction is off by a factor of the gradient, far outside both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowering.run.train import TrainResult

__all__ = ["Parity", "check_parity", "BF16_GRAD_SPREAD", "BF16_FLOOR", "BF16_LOSS"]

#: bf16 tolerances (see the module docstring; measured worst cases in the README).
BF16_GRAD_SPREAD = 4.0
BF16_FLOOR = 1e-3
BF16_LOSS = 2e-3


@dataclass
class Parity:
    ok: bool
    worst_param: str
    worst_rank: int
    worst_err: float
    loss_err: float
    lines: list[str]
    tolerance: str = "loss and gradients within rtol=atol=1e-5; loss curve within 1e-4"


def check_parity(got: TrainResult, ref: TrainResult, *, rtol: float = 1e-5,
                 atol: float = 1e-5, curve_tol: float = 1e-4,
                 fp32: TrainResult | None = None) -> Parity:
    """Every rank's loss (each step) and step-0 gradients against the single-device run.
    With ``fp32`` (the fp32 single-device run of a bf16 ``ref``), the bf16 bounds above
    replace rtol/atol/curve_tol."""
    bf16 = fp32 is not None
    lines: list[str] = []
    ok, worst, ratio = True, ("", 0, 0.0), 0.0
    for name, per_rank in got.grads.items():
        want = ref.grads[name][0]
        if bf16:
            spread = (want - fp32.grads[name][0]).abs().max().item()  # type: ignore[union-attr]
            bound = BF16_GRAD_SPREAD * spread + BF16_FLOOR * want.abs().max().item()
        for r, g in enumerate(per_rank):
            if g is None:  # a pipeline stage that does not hold this parameter
                continue
            err = (g - want).abs().max().item()
            if err > worst[2]:
                worst = (name, r, err)
            if bf16:
                ratio = max(ratio, err / bound if bound else 0.0 if err == 0 else math.inf)
            if not (err <= bound if bf16 else torch.allclose(g, want, rtol=rtol, atol=atol)):
                ok = False
    loss_err = 0.0
    for step, (ls, (want,)) in enumerate(zip(got.losses, ref.losses)):
        for r, v in enumerate(ls):
            err = abs(v - want)
            loss_err = max(loss_err, err)
            tol = (BF16_LOSS * abs(want) if bf16 else
                   atol + rtol * abs(want) if step == 0 else curve_tol)
            if err > tol:
                ok = False
                lines.append(f"step {step} rank {r}: loss {v:.6f} vs single device {want:.6f}")
    if worst[0]:
        of_bound = f" (at most {ratio:.0%} of a gradient's bf16 bound)" if bf16 else ""
        lines.append(f"worst gradient error {worst[2]:.2e} in {worst[0]} on rank {worst[1]}"
                     f"{of_bound}; worst loss error {loss_err:.2e}")
    else:  # every gradient matched bit for bit (or there were none to compare)
        what = (f"gradients exact (0 error) in all {len(got.grads)} parameters"
                if got.grads else "no gradients compared")
        lines.append(f"{what}; worst loss error {loss_err:.2e}")
    tolerance = (f"bf16: each gradient within {BF16_GRAD_SPREAD:g}x the bf16 reference's "
                 f"distance from fp32 + {BF16_FLOOR:g} of its largest entry, losses within "
                 f"{BF16_LOSS:g} relative" if bf16 else Parity.tolerance)
    return Parity(ok, worst[0], worst[1], worst[2], loss_err, lines, tolerance)
