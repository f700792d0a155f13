"""Memory per rank, predicted: what a rank holds during one training step, in bytes.

| category | what | predicted from |
|---|---|---|
| ``params`` | this rank's block of every parameter it holds (fp32 master under bf16) | the plan |
| ``grads`` | a gradient for each, in the parameter's dtype, as stored (FSDP: the shard) | the plan |
| ``optimizer`` | AdamW: ``exp_avg`` and ``exp_avg_sq`` like the parameter, a 4-byte ``step`` each | the plan |
| ``activations`` | what autograd saves for backward (parameters themselves excluded), at its peak: the end of the forward; under a pipeline, the microbatches a stage holds in flight under its schedule | the dry trace: one microbatch per chunk, counted on meta tensors, then the schedule's action order |
| ``buffers`` | FSDP's gathered parameters live at once (their peak), and an all-to-all's send and receive buffers (the largest) | the dry trace and its schedule |
| ``peak`` | the sum: an upper bound (it counts every gradient beside every activation) | |

Nothing here executes: the trace's counts come in as numbers. The measured side is
:mod:`lowering.run.memory` (simulate mode, on real tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn

from lowering.plan.buckets import local_numel
from lowering.plan.lower import Plan
from lowering.plan.pipeline import Kind, Pipe, actions

__all__ = ["Memory", "CATEGORIES", "state_bytes", "in_flight_peak", "ADAM_STEP_BYTES", "human"]

CATEGORIES = ("params", "grads", "optimizer", "activations", "buffers")

#: torch's AdamW keeps ``step`` as a float32 scalar tensor per parameter (not fused, not
#: capturable: ``torch.optim.adamw``'s default on CPU and CUDA alike).
ADAM_STEP_BYTES = 4


def human(n: float) -> str:
    """Bytes in B/KiB/MiB/GiB with three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class Memory:
    """One rank's bytes per category."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    buffers: int = 0

    @property
    def peak(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def json(self) -> dict[str, int]:
        return {**asdict(self), "peak": self.peak}


def state_bytes(plan: Plan, model: nn.Module) -> Memory:
    """Parameters, gradients and AdamW state of ``model`` (a pipeline stage's: the
    parameters it holds) on rank 0 of ``plan``'s mesh; tied parameters count once."""
    plans = {p.name: p for p in plan.params}
    aliases = dict(plan.aliases)
    params = grads = opt = 0
    for name, p in model.named_parameters():  # one name per tensor (tied: the first)
        pp = plans.get(aliases.get(name, name))
        nbytes = (local_numel(pp, plan, gathered=False) if pp else p.numel()) * p.element_size()
        params += nbytes
        if p.requires_grad:
            grads += nbytes
            opt += 2 * nbytes + ADAM_STEP_BYTES
    return Memory(params=params, grads=grads, optimizer=opt)


def in_flight_peak(pipe: Pipe, pp_rank: int, per_microbatch: Mapping[int, int],
                   released: Mapping[int, int] | None = None) -> int:
    """The most activation bytes pipeline rank ``pp_rank`` holds at once: walk its action
    order, a forward of chunk ``c`` adds ``per_microbatch[c]`` (what one microbatch's
    forward of that chunk saves), its backward releases ``released[c]`` (all of it unless
    given: a traced backward may leave a few saved tensors alive until the step ends).
    GPipe holds every microbatch; 1F1B at most ``pp - rank`` of them; interleaved in
    between."""
    released = per_microbatch if released is None else released
    held = peak = 0
    for a in actions(pipe, pp_rank):
        if a.kind is Kind.F:
            held += per_microbatch.get(a.chunk, 0)
            peak = max(peak, held)
        elif a.kind is Kind.B:
            held -= released.get(a.chunk, per_microbatch.get(a.chunk, 0))
    return peak
