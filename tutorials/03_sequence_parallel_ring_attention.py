"""Lesson 03: sequence parallelism and ring attention.

Lesson 02 split the batch (dp) and the weights (tp). Long sequences need a third cut:
split the sequence itself over sp ranks (rule ``seq -> sp``). Every per-token layer
(embeddings, norms, MLP) then runs on its own block of tokens with no communication;
only attention mixes tokens, and a query needs every key before it. So the key/value
blocks travel a ring: n steps, n-1 exchanges with ``sl.ppermute``, each step's partial
result merged by the online-softmax (log-sum-exp) rule. You will see:

  (a) the ring on Mesh(sp=4), from real collectives: which K/V block every rank holds
      at every step, and whether the causal mask lets it see that block;
  (b) ``sl.attention(q, k, v, causal=True)`` on a seq-sharded layout equals torch's
      scaled_dot_product_attention, and its schedule: 3 + 3 K/V permutes;
  (c) load balancing: causally, later ranks do more work; giving rank r the chunks r
      and 2n-1-r evens it out, and gpt-tiny still matches one device;
  (d) Megatron-style sequence parallelism on tp, a rules change only: all-gather +
      reduce-scatter instead of all-reduce, with the same wire bytes.

Run it:  python tutorials/03_sequence_parallel_ring_attention.py
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from rich.console import Console

import shardlang as sl
from lowering.printer import print_schedule
from lowering.run.functions import trace_function
from lowering.run import Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.parallel.sequence import causal_work, load_balanced_order
from models.gpt import Block

MODEL = resolve("gpt-tiny")
N = 4                                  # sp ranks in (a) and (b)
B, H, S, D = 2, 4, 32, 8               # batch, heads, seq, head_dim in (b)
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def ring(x: torch.Tensor) -> torch.Tensor:
    """Local view, one element per rank: this rank's index, then the owner of the block
    it holds at each ring step (a block filled with its owner's index, passed along)."""
    me = sl.axis_index("sp")
    held = torch.zeros_like(x) + me                    # step 0: our own block
    seen = [me.reshape(1).to(x.dtype), held]
    for _ in range(N - 1):                             # n steps need n-1 exchanges
        held = sl.ppermute(held, "sp", shift=1)        # send to rank i+1, receive from i-1
        seen.append(held)
    return torch.stack(seen, dim=1)                    # (1, n+1)


def visibility(rank: int, owner: int, c: int) -> tuple[str, int]:
    """How the causal mask treats queries of ``rank`` against keys of ``owner``."""
    q_pos, k_pos = rank * c + torch.arange(c), owner * c + torch.arange(c)
    seen = int((q_pos[:, None] >= k_pos[None, :]).sum())
    return ("full" if seen == c * c else "masked" if seen == 0 else "diagonal"), seen


def section_a() -> None:
    header(f"(a) The ring on Mesh(sp={N}): who holds which K/V block, step by step")
    f = sl.shard_map(ring, in_axes=(("seq",),), out_axes=("seq", None))
    t = trace_function(f, [torch.zeros(N)], mesh=sl.Mesh(sp=N), rules=sl.Rules(seq="sp"))
    table = t.output.long()                            # row r: [r, owner at step 0..n-1]
    permutes = [r for r in t.records if r.op.value == "permute" and r.axis == "sp"]
    print(f"The traced function issued {len(permutes)} permutes over sp for {N} steps "
          f"(shift {sorted({r.peer_shift for r in permutes})}).")
    c = S // N
    print(f"seq {S} split in {N} blocks of {c} tokens; rank r holds queries "
          f"r*{c} .. r*{c}+{c - 1} all along.")
    print("K/V block held at each step, what the causal mask makes of it, and the")
    print(f"unmasked (query, key) pairs it leaves (of {c}x{c} = {c * c}):")
    print("  step | " + " | ".join(f"rank {int(table[r, 0])}".ljust(19) for r in range(N)))
    agree, work = True, [0] * N
    for step in range(N):
        cells = []
        for r in range(N):
            owner = int(table[r, 1 + step])
            agree &= owner == (r - step) % N
            kind, seen = visibility(r, owner, c)
            work[r] += seen
            cells.append(f"K/V {owner} {kind:8} {seen:4}")
        print(f"  {step:4} | " + " | ".join(cells))
    print("   sum | " + " | ".join(f"{w:19}" for w in work))
    print(f"owner = (rank - step) mod {N} in every cell: {'yes' if agree else 'NO'}")
    if not agree or work != causal_work(S, N, balanced=False):
        raise SystemExit("the ring did not deliver the blocks in the expected order")
    print("'full': all keys are earlier tokens; 'diagonal': the causal mask applies inside")
    print("the block; 'masked': all keys are later tokens, and the rank skips the step's")
    print("compute. Each step runs a fused attention kernel on the block, which returns the")
    print("block's output and log-sum-exp, and rescales the running output:")
    print("out = out*exp(lse-new) + o_blk*exp(lse_blk-new), new = logaddexp(lse, lse_blk),")
    print("so the result is softmax over all keys at once, and no (c, c) score matrix is")
    print("kept for backward.")


def section_b() -> None:
    header(f"(b) sl.attention on Mesh(sp={N}) vs torch's scaled_dot_product_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    rules = sl.Rules(batch="dp", heads="tp", seq="sp")
    mesh = sl.Mesh(sp=N)
    print(f"q, k, v: (batch, heads, seq, head_dim) = {(B, H, S, D)}, {rules!r}")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sl.attention(q, k, v, causal=True)

    t = trace_function(attend, [q, k, v], mesh=mesh, rules=rules, backward=True)
    err = (t.output - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max()
    print(f"output placements {t.placements}; each rank holds {tuple(t.local[0].shape)}")
    print(f"ring attention matches scaled_dot_product_attention (max error {err:.1e})")
    assert err < 1e-5, err
    print_schedule(t.records, mesh, console=console,
                   title="Ring attention, forward + backward: schedule of rank 0")
    payload = 2 * B * H * (S // N) * D * 4
    for phase in ("forward", "backward"):
        mine = [r for r in t.records if r.phase.value == phase]
        ok = all(r.op.value == "permute" and r.axis == "sp" and r.bytes == payload
                 for r in mine)
        print(f"{phase}: {len(mine)} permutes over sp of {sorted({r.bytes for r in mine})} B;"
              f" 2*b*h*(s/n)*d*4 = 2*{B}*{H}*{S // N}*{D}*4 = {payload} B: "
              f"{'equal' if ok else 'NOT EQUAL'}")
        if not ok or len(mine) != N - 1:
            raise SystemExit(f"{phase} schedule differs from n-1 K/V exchanges")
    print("K and V travel stacked (the 2). Backward computes each block's gradients from")
    print("the whole output and log-sum-exp (FlashAttention's rule) and sends the K/V")
    print("gradient back the other way, gathering each block's share: the inverse of each")
    print("forward permute.")


def section_c() -> None:
    header(f"(c) Load balancing the causal mask (seq {S}, sp={N})")
    c, h = S // N, S // N // 2
    plain, balanced = causal_work(S, N, balanced=False), causal_work(S, N, balanced=True)
    formula = [r * c * c + c * (c + 1) // 2 for r in range(N)]
    print("unmasked (query, key) pairs per rank, contiguous blocks:")
    print("  " + ", ".join(f"rank {r}: {w}" for r, w in enumerate(plain)) +
          f"; max/min {max(plain) / min(plain):.2f}")
    print(f"  = r*c^2 + c(c+1)/2 with c = {c}: {formula}: "
          f"{'equal' if formula == plain else 'NOT EQUAL'}; as c grows max/min -> 2n-1 "
          f"= {2 * N - 1}")
    order = load_balanced_order(S, N).view(N, c)
    print(f"load-balanced: {2 * N} chunks of {h}; rank r holds chunks r and {2 * N - 1}-r:")
    for r in range(N):
        lo, hi = order[r, :h], order[r, h:]
        print(f"  rank {r}: tokens {int(lo[0])}-{int(lo[-1])} + {int(hi[0])}-{int(hi[-1])}")
    even = (2 * N - 1) * h * h + h * (h + 1)
    print("unmasked pairs per rank, load-balanced:")
    print("  " + ", ".join(f"rank {r}: {w}" for r, w in enumerate(balanced)) +
          f"; max/min {max(balanced) / min(balanced):.2f}")
    print(f"  = (2n-1)*h^2 + h(h+1) with h = {h}: {even} on every rank: "
          f"{'equal' if set(balanced) == {even} else 'NOT EQUAL'}")
    print(f"same total work: {sum(plain)} = {sum(balanced)}: "
          f"{'yes' if sum(plain) == sum(balanced) else 'NO'}")
    print("\nThe whole model, load-balanced, 2 training steps in simulate mode:")
    layout = Layout(MODEL, sl.Mesh(sp=2), sl.Rules.default(), load_balance=True)
    _, parity = simulate(layout, steps=2, check=True)
    assert parity is not None
    for line in parity.lines:
        print(f"  {line}")
    print(f"gpt-tiny on Mesh(sp=2), load_balance=True: parity ok = {parity.ok}")
    if not parity.ok:
        raise SystemExit("load-balanced sp does NOT match the single-device model")


def block_collectives(rules: sl.Rules) -> tuple[dict[tuple[str, str], int], float, list]:
    ex = explain(Layout(MODEL, sl.Mesh(tp=2), rules))
    mine = [r for r in ex.schedules.ranks[0] if r.site == "blocks.0"]
    counts: dict[tuple[str, str], int] = {}
    for r in mine:
        counts[(r.phase.value, r.op.value)] = counts.get((r.phase.value, r.op.value), 0) + 1
    return counts, sum(r.wire_bytes for r in mine), mine


def section_d() -> None:
    header("(d) Megatron-style sequence parallelism: norm_seq on tp, Mesh(tp=2)")
    src = [ln.strip() for ln in inspect.getsource(Block.forward).splitlines()
           if "norm_seq" in ln and "=" in ln and not ln.strip().startswith("#")]
    print("models/gpt.py, Block.forward names the residual stream's dims (and so the norms'):")
    for ln in src:
        print(f"  {ln}")
    print("while attention and the MLP take ('batch', 'seq', 'embed'). The default rules map")
    print("both seq and norm_seq to sp; mapping norm_seq to tp as well shards the norm regions")
    print("on the sequence over tp. The model names the axis, so this is a rules change only.")
    plain = sl.Rules.default()
    mega = sl.Rules.parse("norm_seq=tp", base=plain)
    model = MODEL.build(meta=True)
    batch, seq, width = MODEL.batch, MODEL.default_seq(model), model.config.n_embd
    results = {}
    for name, rules in (("plain TP", plain), ("Megatron-SP", mega)):
        counts, wire, mine = block_collectives(rules)
        results[name] = (wire, mine)
        print(f"\n{name}: norm_seq -> {rules.mesh_entry('norm_seq')!r}; blocks.0 issues")
        for (phase, op), k in counts.items():
            print(f"  {phase:8} {k} x {op}")
        print(f"  payloads {sorted({r.bytes for r in mine})} B "
              f"(b*s*h*4 = {batch}*{seq}*{width}*4 = {batch * seq * width * 4} B), "
              f"wire bytes {wire:,.0f} B")
    (w_tp, _), (w_sp, _) = results["plain TP"], results["Megatron-SP"]
    same = w_tp == w_sp
    print(f"\nblocks.0 wire bytes: plain TP {w_tp:,.0f} B, Megatron-SP {w_sp:,.0f} B: "
          f"{'equal' if same else 'NOT EQUAL'}")
    per_op = {r.op.value: r.wire_bytes for name in results for r in results[name][1]}
    print(f"An all-reduce is a reduce-scatter then an all-gather: all_reduce sends "
          f"2(n-1)/n*S = {per_op['all_reduce']:,.0f} B,")
    print(f"reduce_scatter + all_gather send (n-1)/n*S each = {per_op['reduce_scatter']:,.0f}"
          f" + {per_op['all_gather']:,.0f} B.")
    print("Megatron-SP splits it around the norms, which then run on s/tp tokens each.")
    print("The model never changed: only the rule for the logical axis norm_seq did.")
    _, parity = simulate(Layout(MODEL, sl.Mesh(tp=2), mega), steps=2, check=True)
    assert parity is not None
    for line in parity.lines:
        print(f"  {line}")
    print(f"gpt-tiny on Mesh(tp=2), Megatron-SP: parity ok = {parity.ok}")
    if not same or not parity.ok:
        raise SystemExit("Megatron-SP differs from plain TP")


def main() -> None:
    section_a()
    section_b()
    section_c()
    section_d()


if __name__ == "__main__":
    main()
