"""Sequence parallelism (``sp``): ring attention and load-balanced causal sharding.

| piece                 | forward                                        | backward                         |
|-----------------------|------------------------------------------------|----------------------------------|
| activations           | sequence dim ``Shard`` over sp                 | the same                          |
| ring attention        | n-1 ``sl.ppermute`` of the stacked K/V block   | n-1 inverse permutes of its grad |
| parameters            | replicated                                     | gradient all-reduce over sp      |
| Megatron-SP (rules)   | ``norm_seq -> tp``: all-gather before, reduce-scatter after | the reverse            |

When the sequence dim of attention is sharded over a mesh axis of n ranks, each rank
keeps its queries and passes its key/value block around the ring with ``sl.ppermute``:
n steps, n-1 exchanges (with grouped-query attention the ring carries the fewer
key/value heads, expanded to the query heads locally). Each step attends to one K/V
block and merges the partial result by the online-softmax rule (keep a running log-sum-exp ``lse``; rescale the old
output by exp(lse - new_lse) and the new block's by exp(block_lse - new_lse)).
Everything is ordinary autograd, so backward (the inverse permutes included) is right.

The causal mask compares token *positions*, computed from each block's owner rank
(``sl.axis_index``) and the layout, so one program serves every rank. With plain
causal sharding rank n-1 does n times rank 0's useful work; load-balanced sharding
gives rank r the chunks r and 2n-1-r of 2n, so every rank does the same.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh

import shardlang as sl
from lowering._torch import all_to_all_single, per_rank, wait
from lowering.schedule import Op, Recorder

__all__ = ["load_balanced_order", "block_positions", "ring_attention", "causal_work", "ppermute"]

_MASKED = -1e30  # finite, so a fully masked block gives weight 0 and no NaN


def load_balanced_order(seq: int, n: int) -> torch.Tensor:
    """The token order for load-balanced causal sharding over n ranks: contiguous blocks
    of this order give rank r the chunks r and 2n-1-r (of 2n equal chunks)."""
    c = seq // (2 * n)
    chunks = torch.arange(seq).view(2 * n, c)                       # (2n, c)
    return torch.cat([torch.cat((chunks[r], chunks[2 * n - 1 - r])) for r in range(n)])


def block_positions(owner: torch.Tensor, n: int, c: int, *, balanced: bool) -> torch.Tensor:
    """Positions of the c tokens held by rank ``owner`` (a 0-d tensor: rank-dependent)."""
    if not balanced:
        return owner * c + torch.arange(c)
    h = c // 2
    return torch.cat((owner * h + torch.arange(h), (2 * n - 1 - owner) * h + torch.arange(h)))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, axis: str, n: int,
                   causal: bool, scale: float | None, balanced: bool) -> torch.Tensor:
    """Attention over a sequence sharded on ``axis`` (local view: (b, h, c, d) blocks)."""
    c = q.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    me = sl.axis_index(axis)
    q_pos = block_positions(me, n, c, balanced=balanced).to(q.device)
    kv = torch.stack((k, v))                                          # (2, b, hk, c, d)
    group = q.shape[1] // k.shape[1]  # grouped-query attention: query heads per K/V head
    out = lse = None
    for step in range(n):
        kh, vh = (kv[0], kv[1]) if group == 1 else (
            kv[0].repeat_interleave(group, 1), kv[1].repeat_interleave(group, 1))  # (b, h, c, d)
        scores = (q @ kh.transpose(-2, -1)) * scale                   # (b, h, c, c)
        if causal:
            owner = (me - step) % n                                   # whose K/V we hold now
            k_pos = block_positions(owner, n, c, balanced=balanced).to(q.device)
            scores = scores.masked_fill(q_pos[:, None] < k_pos[None, :], _MASKED)
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)     # (b, h, c, 1)
        block_out = torch.exp(scores - block_lse) @ vh                # (b, h, c, d)
        if out is None:
            out, lse = block_out, block_lse
        else:
            new = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - new) + block_out * torch.exp(block_lse - new)
            lse = new
        if step < n - 1:
            kv = sl.ppermute(kv, axis, shift=1)                       # pass K/V along the ring
    return out  # type: ignore[return-value]  # n >= 1 steps


def causal_work(seq: int, n: int, *, balanced: bool) -> list[int]:
    """Unmasked (query, key) pairs each of the n ranks computes in causal ring attention."""
    c = seq // n
    order = load_balanced_order(seq, n) if balanced else torch.arange(seq)
    pos = order.view(n, c)
    return [int((pos[r][:, None] >= order[None, :]).sum()) for r in range(n)]


class _PPermute(torch.autograd.Function):
    """Forward: send to rank i+shift. Backward: the inverse permute (shift by -shift)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sub: DeviceMesh, shift: int,  # noqa: ANN001
                recorder: Recorder | None) -> torch.Tensor:
        ctx.sub, ctx.shift, ctx.recorder = sub, shift, recorder
        return _permute(x, sub, shift, recorder)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return _permute(grad.contiguous(), ctx.sub, -ctx.shift, ctx.recorder), None, None, None


def _permute(x: torch.Tensor, sub: DeviceMesh, shift: int, recorder: Recorder | None) -> torch.Tensor:
    n, rows = sub.size(), x.shape[0]

    me = sub.get_local_rank()  # one value per simulated rank in simulate mode

    def split(peer_offset: int, j: int) -> int:
        return per_rank(lambda r: rows if j == (int(r) + peer_offset) % n else 0)(me)

    send = [split(shift, j) for j in range(n)]   # my rows go to rank me + shift
    recv = [split(-shift, j) for j in range(n)]  # rank me - shift's rows come to me
    group = sub.get_group()
    if recorder is None:
        out = all_to_all_single(x.contiguous(), recv, send, group)
    else:
        with recorder.explicit(Op.PERMUTE, shift=shift):
            out = all_to_all_single(x.contiguous(), recv, send, group)
    return wait(out)


def ppermute(x: torch.Tensor, sub: DeviceMesh, shift: int, recorder: Recorder | None) -> torch.Tensor:
    """``sl.ppermute`` on a rank's local block: rank i of ``sub`` sends ``x`` to rank
    (i + shift) mod n, as an all-to-all with one non-empty block (recorded as a permute)."""
    return _PPermute.apply(x, sub, shift, recorder)
