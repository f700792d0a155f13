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
block with a fused attention kernel, which returns the block's output and log-sum-exp
``lse``, and merges it by the online-softmax rule (rescale the old output by
exp(lse - new_lse) and the block's by exp(block_lse - new_lse)). Nothing of size
(c, c) is kept for backward: the ring is one autograd node that saves the queries, the
K/V blocks, the output and ``lse``, and computes each block's gradient from the whole
output and ``lse`` (FlashAttention's backward rule), sending the K/V gradient back
around the ring (the n-1 inverse permutes autograd would issue).

Under a causal mask each rank computes only the unmasked part of each block, decided
per rank from its index on the axis (``sl.axis_index``) and the block's owner: its own
block causally, an earlier owner's in full and a later owner's not at all. With plain
causal sharding rank n-1 does n times rank 0's useful work; load-balanced sharding
gives rank r the chunks r and 2n-1-r of 2n, so every rank does the same (half an
earlier owner's block, the first chunk; half a later owner's, the second chunk's rows).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh

import shardlang as sl
from lowering._torch import (all_to_all_single, fused_attention_block,
                             fused_attention_block_backward, per_rank, wait)
from lowering.schedule import Op, Recorder

__all__ = ["load_balanced_order", "ring_attention", "causal_work", "ppermute"]

def load_balanced_order(seq: int, n: int) -> torch.Tensor:
    """The token order for load-balanced causal sharding over n ranks: contiguous blocks
    of this order give rank r the chunks r and 2n-1-r (of 2n equal chunks)."""
    c = seq // (2 * n)
    chunks = torch.arange(seq).view(2 * n, c)                       # (2n, c)
    return torch.cat([torch.cat((chunks[r], chunks[2 * n - 1 - r])) for r in range(n)])


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, axis: str, n: int,
                   causal: bool, scale: float | None, balanced: bool, sub: DeviceMesh,
                   recorder: Recorder | None) -> torch.Tensor:
    """Attention over a sequence sharded on ``axis`` (local view: (b, h, c, d) blocks;
    ``sub``: the axis's mesh, on which the backward sends gradients back)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _Ring.apply(q, k, v, axis, n, causal, scale, balanced, sub, recorder)


class _Ring(torch.autograd.Function):
    """The ring as one autograd node. Forward: n steps, each one block by a fused kernel
    (only the block's unmasked part), merged by log-sum-exp; it saves the queries, the K/V
    blocks it saw, the output and the log-sum-exp: no (c, c) score matrix. Backward: each
    block's gradient from the *whole* output and log-sum-exp (the FlashAttention rule,
    so the blocks' gradients add up to the whole's); the K/V gradient travels back along
    the ring, collecting each block's share: n-1 inverse permutes, as autograd's would."""

    @staticmethod
    def forward(ctx, q, k, v, axis, n, causal, scale, balanced, sub, recorder):  # noqa: ANN001, ANN205
        me = sl.axis_index(axis)
        kv = torch.stack((k, v))                                          # (2, b, hk, c, d)
        blocks, out, lse = [], None, None
        for step in range(n):
            blocks.append(kv)
            out, lse = _step(q, kv, out, lse, me, step=step, n=n, causal=causal,
                             scale=scale, balanced=balanced)
            _count_skipped(recorder, q, me, step=step, n=n, causal=causal, balanced=balanced)
            if step < n - 1:
                kv = sl.ppermute(kv, axis, shift=1)                       # pass K/V along the ring
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse, *blocks)
        ctx.me, ctx.sub, ctx.recorder = me, sub, recorder
        ctx.n, ctx.causal, ctx.scale, ctx.balanced = n, causal, scale, balanced
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        q, out, lse, *blocks = ctx.saved_tensors
        me = ctx.me
        dout = dout.contiguous()
        dq, dkv = None, None
        for step in reversed(range(ctx.n)):
            if dkv is not None:  # the later blocks' gradient comes back one step
                dkv = _permute(dkv.contiguous(), ctx.sub, -1, ctx.recorder)
            dq_s, dkv_s = _step_backward(dout, q, blocks[step], out, lse, me, step=step,
                                         n=ctx.n, causal=ctx.causal, scale=ctx.scale,
                                         balanced=ctx.balanced)
            _count_skipped(ctx.recorder, q, me, step=step, n=ctx.n, causal=ctx.causal,
                           balanced=ctx.balanced, backward=True)
            dq = dq_s if dq is None else dq + dq_s
            dkv = dkv_s if dkv is None else dkv + dkv_s
        return dq, dkv[0], dkv[1], *[None] * 8


def _block_of(me: int, step: int, n: int, c: int, *, causal: bool, balanced: bool,
              dry: bool) -> tuple[slice, slice, bool] | None:
    """Which part of step ``step``'s block rank ``me`` computes: (query rows, key/value
    columns, causal mask on that part), or None when the causal mask hides all of it.
    Positions rise along each rank's rows (a balanced rank's two chunks in order), so the
    block of its own keys is plainly causal; a balanced rank's first chunk sees only the
    first chunk of an earlier owner, and only its second chunk sees a later owner.
    ``dry`` (meta tensors: a dry trace, whose compute feeds the predicted step time): the
    blocks of the busiest rank, n-1, which computes every block when the causal sequence
    is not load-balanced (the schedule, the memory and the saved tensors are alike on
    every rank)."""
    whole, half = slice(None), c // 2
    if dry and causal and not balanced:
        me = n - 1  # a dry trace times the busiest rank: the step waits for it
    owner = (me - step) % n
    if not causal:
        return whole, whole, False
    if owner == me:
        return whole, whole, True
    if balanced:
        return (whole, slice(0, half), False) if owner < me else (slice(half, c), whole, False)
    return (whole, whole, False) if owner < me else None


def _count_skipped(recorder: Recorder | None, q: torch.Tensor, me: torch.Tensor, *, step: int,
                   n: int, causal: bool, balanced: bool, backward: bool = False) -> None:
    """A dry trace counts the blocks the causal mask lets a rank skip in the model's FLOPs
    (as one causal kernel over the whole sequence counts them) at no time: the FLOP
    formulas of torch's SDPA, 4*b*h*d per (query, key) pair forward, 2.5 times that back."""
    if recorder is None or q.device.type != "meta":
        return
    b, h, c, d = q.shape
    part = _block_of(int(me), step, n, c, causal=causal, balanced=balanced, dry=True)
    done = 0 if part is None else len(range(c)[part[0]]) * len(range(c)[part[1]])
    recorder.skipped_attention(4 * b * h * d * (c * c - done) * (2.5 if backward else 1.0))


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, 1)


def _part(q: torch.Tensor, kv: torch.Tensor, me: torch.Tensor, *, step: int, n: int,
          causal: bool, balanced: bool) -> tuple[slice, slice, bool, torch.Tensor, torch.Tensor] | None:
    """What one ring step computes on one rank: (query rows, key columns, causal within the
    block, the block's K and V repeated to the query heads), None when it is all masked."""
    part = _block_of(int(me), step, n, q.shape[2], causal=causal, balanced=balanced,
                     dry=q.device.type == "meta")
    if part is None:
        return None
    rows, cols, masked = part
    group = q.shape[1] // kv.shape[2]  # grouped-query attention: query heads per K/V head
    return (rows, cols, masked, _expand(kv[0][:, :, cols], group),
            _expand(kv[1][:, :, cols], group))


@per_rank
def _step(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None,
          me: torch.Tensor, *, step: int, n: int, causal: bool, scale: float,
          balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step on one rank: attend to the K/V block held now, merge into (out, lse)."""
    part = _part(q, kv, me, step=step, n=n, causal=causal, balanced=balanced)
    if part is None:
        return out, lse  # type: ignore[return-value]  # step 0 (own block) always computes
    rows, cols, masked, k, v = part
    o, l = _block(q[:, :, rows], k, v, causal=masked, scale=scale)
    o = o.float()
    if out is None:
        return o, l
    new = torch.logaddexp(lse[:, :, rows], l)
    merged = (out[:, :, rows] * torch.exp(lse[:, :, rows] - new)[..., None]
              + o * torch.exp(l - new)[..., None])
    if rows == slice(None):
        return merged, new
    out, lse = out.clone(), lse.clone()
    out[:, :, rows], lse[:, :, rows] = merged, new
    return out, lse


@per_rank
def _step_backward(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, me: torch.Tensor, *, step: int, n: int, causal: bool,
                   scale: float, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step's gradients on one rank: (queries', this K/V block's)."""
    dq, dkv = torch.zeros_like(q), torch.zeros_like(kv)
    part = _part(q, kv, me, step=step, n=n, causal=causal, balanced=balanced)
    if part is None:
        return dq, dkv
    rows, cols, masked, k, v = part
    hk = kv.shape[2]
    group = q.shape[1] // hk
    g_q, g_k, g_v = _block_backward(dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows],
                                    lse[:, :, rows], causal=masked, scale=scale)
    dq[:, :, rows] = g_q
    for i, g in enumerate((g_k, g_v)):
        dkv[i][:, :, cols] = g if group == 1 else g.unflatten(1, (hk, group)).sum(2)
    return dq, dkv


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, fp32 log-sum-exp) of one block: the fused kernel where there is one, else
    the scores computed here (one block at a time, not saved)."""
    fused = fused_attention_block(q, k, v, causal=causal, scale=scale)
    if fused is not None:
        return fused
    s = _scores(q, k, causal=causal, scale=scale)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype), lse


def _block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = fused_attention_block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    if fused is not None:
        return fused
    p = torch.exp(_scores(q, k, causal=causal, scale=scale) - lse[..., None])
    do = dout.float()
    ds = p * (do @ v.float().transpose(-2, -1) - (do * out.float()).sum(-1, keepdim=True))
    dq, dk = (ds @ k.float()) * scale, (ds.transpose(-2, -1) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), (p.transpose(-2, -1) @ do).to(v.dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


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
