"""Lesson 04: expert parallelism with a mixture-of-experts layer.

``gpt-moe-tiny`` is gpt-tiny whose blocks 1 and 3 replace the MLP by 4 experts (small
MLPs) and a router that sends each token to its top-2 experts (models/moe.py). With
the rule ``experts -> ep`` each ep rank holds 4/ep whole experts; tokens stay sharded
over (dp, ep) as in any dense layer. So a token and the expert it needs usually live
on different ranks, and the layer moves tokens, not weights: one all-to-all sends
every token to its experts' rank (dispatch), another brings the results back
(combine). You will see:

  (a) the plan: where each expert lives;
  (b) routing on Mesh(ep=2): which token goes to which expert on which rank, and how
      many tokens each rank sends to each rank;
  (c) capacity: each expert takes at most C = ceil(cf * k * T / n_experts) tokens
      from a rank (T: the tokens that rank routes); shrink the capacity factor cf and
      tokens drop, differently on ep=2 and dp=2 x ep=2 (T differs);
  (d) the Switch load-balancing loss, equal on every layout, and 3 training steps on
      Mesh(dp=2, ep=2) that match one device;
  (e) the schedule: 2 all-to-alls forward and 2 backward per MoE layer, each
      carrying n_experts * C * width * 4 bytes.

Run it:  python tutorials/04_expert_parallel_moe.py
"""

from __future__ import annotations

import math

import torch

import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import ModelRef, resolve
from models.datasets import ArithmeticSequences
from models.gpt import GPT, GPTConfig
from models.moe import MoE, Routing, route

MODEL = resolve("gpt-moe-tiny")
LAYER = 1  # the first MoE block


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def with_capacity(cf: float) -> ModelRef:
    """gpt-moe-tiny with another capacity factor (same weights: cf creates none)."""
    return ModelRef(f"gpt-moe-tiny cf={cf}",
                    lambda: GPT(GPTConfig(n_experts=4, top_k=2, capacity_factor=cf)))


def rows_of(mesh: sl.Mesh, rank: int, batch: int) -> range:
    """The batch rows ``rank`` holds: batch is sharded over (dp, ep), dp outer."""
    c = mesh.coordinate(rank)
    per = batch // (mesh.dp * mesh.ep)
    chunk = c.get("dp", 0) * mesh.ep + c.get("ep", 0)
    return range(chunk * per, (chunk + 1) * per)


def moe_input() -> tuple[MoE, torch.Tensor]:
    """Block LAYER's MoE and its input (B, S, E) for step 0's batch, on one device."""
    model = MODEL.build(seed=0)
    seen: list[torch.Tensor] = []
    moe = model.blocks[LAYER].mlp
    assert isinstance(moe, MoE)
    moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    idx, _ = ArithmeticSequences(256).batch(0, MODEL.batch, 32)
    with torch.no_grad():
        model(idx)
    return moe, seen[0]


def per_rank_routing(moe: MoE, x: torch.Tensor, mesh: sl.Mesh, cf: float) -> dict[int, Routing]:
    """Each rank routes its own tokens with its own capacity (one rank per ep group)."""
    out = {}
    for r in range(mesh.size):
        local = x[list(rows_of(mesh, r, x.shape[0]))].flatten(0, 1)  # (T, E)
        with torch.no_grad():
            probs = moe.router(local).softmax(-1)                     # (T, X)
        cap = math.ceil(cf * moe.top_k * local.shape[0] / moe.n_experts)
        out[r] = route(probs, moe.top_k, cap)
    return out


def main() -> None:
    moe, x = moe_input()
    X, k, E = moe.n_experts, moe.top_k, moe.embed
    B, S = x.shape[:2]
    cf0 = moe.capacity_factor
    print(f"{MODEL.name}: MoE in blocks 1 and 3, {X} experts, top-{k}, capacity factor {cf0}, "
          f"width {E}, batch {B} x seq {S} = {B * S} tokens")

    header("(a) The plan on Mesh(ep=2): experts sharded, everything else replicated")
    mesh = sl.Mesh(ep=2)
    ex = explain(Layout(MODEL, mesh))
    schedules = {mesh: ex.schedules.ranks[0]}  # rank 0's schedule, for part (e)
    for p in ex.plan.params:
        if p.name.startswith(f"blocks.{LAYER}.mlp."):
            print(f"  {p.name:28} {str(p.shape):13} {p.spec!r:22} {p.placements}")
    per = X // mesh.ep
    for r in range(mesh.ep):
        print(f"  ep rank {r} holds experts {list(range(r * per, (r + 1) * per))}: "
              f"expert e lives on rank e // (n_experts/ep) = e // {per}")

    header("(b) Routing on Mesh(ep=2): which token goes where")
    routing = per_rank_routing(moe, x, mesh, cf0)
    for r, rt in routing.items():
        rows = rows_of(mesh, r, B)
        print(f"rank {r} holds batch rows {rows.start}..{rows.stop - 1} "
              f"({len(rows) * S} tokens); its first 3:")
        for t in range(3):
            b, s = rows.start + t // S, t % S
            ex_, g = rt.expert[t].tolist(), rt.gate[t].tolist()
            print(f"  token (b={b}, s={s}): experts {ex_} gates "
                  f"[{', '.join(f'{v:.3f}' for v in g)}] -> ranks {[e // per for e in ex_]}, "
                  f"slots {rt.slot[t].tolist()}")
    print("token choices each rank sends to each rank (dispatch all-to-all, kept choices):")
    for src, rt in routing.items():
        dest = (rt.expert // per)[rt.kept]
        sends = [int((dest == d).sum()) for d in range(mesh.ep)]
        print(f"  rank {src} -> " + ", ".join(f"rank {d}: {n}" for d, n in enumerate(sends)))
    counts = sum(torch.bincount(rt.expert.flatten(), minlength=X) for rt in routing.values())
    result, parity = simulate(Layout(MODEL, mesh), steps=1, check=True)
    got = result.metrics[0][f"moe{LAYER}.tokens_per_expert"]
    print(f"tokens per expert, from this routing: {counts.tolist()}; simulate(ep=2) reports "
          f"moe{LAYER}.tokens_per_expert {[int(v) for v in got]}: "
          f"{'equal' if [int(v) for v in got] == counts.tolist() else 'DIFFERENT'}")

    header("(c) Capacity: C = ceil(cf * k * T / n_experts) slots per expert per rank")
    both = sl.Mesh(dp=2, ep=2)
    print(f"  {'cf':>5} | ep=2: T, C, dropped (of {B * S * k} choices) | "
          f"dp=2 x ep=2: T, C, dropped")
    for cf in (2.0, 1.5, 1.25, 1.0, 0.75, 0.5):
        cells = []
        for m in (mesh, both):
            rts = per_rank_routing(moe, x, m, cf)
            dropped = sum(int(rt.dropped) for rt in rts.values())
            T = B * S // (m.dp * m.ep)
            cells.append(f"T={T:3}, C={rts[0].capacity:3}, dropped {dropped:3} "
                         f"({dropped / (B * S * k):5.1%})")
        print(f"  {cf:5} | " + " | ".join(cells))
    print(f"cf = n_experts/k = {X / k} gives C = T: a token picks an expert at most once, so no")
    print("expert can be asked for more than T slots and nothing drops, on any layout.")
    for m in (mesh, both):
        rts = per_rank_routing(moe, x, m, 1.0)
        want = sum(int(rt.dropped) for rt in rts.values())
        res, _ = simulate(Layout(with_capacity(1.0), m), steps=1)
        reported = int(res.metrics[0][f"moe{LAYER}.dropped"])
        print(f"simulate({m!r}) at cf=1.0 reports moe{LAYER}.dropped = {reported}, computed "
              f"here {want}: {'equal' if reported == want else 'DIFFERENT'}")

    header("(d) The Switch load-balancing loss: n_experts * sum_e f_e * P_e")
    with torch.no_grad():
        probs = moe.router(x.flatten(0, 1)).softmax(-1)  # (B*S, X)
    f = torch.bincount(probs.argmax(-1), minlength=X) / probs.shape[0]
    P = probs.mean(0)
    balance = X * float((f * P).sum())
    print(f"  f (fraction of first choices) = [{', '.join(f'{v:.3f}' for v in f.tolist())}]")
    print(f"  P (mean router probability)   = [{', '.join(f'{v:.3f}' for v in P.tolist())}]")
    print(f"  balance = {X} * sum f*P = {balance:.6f} (1.0 when perfectly uniform; {X}.0 when "
          "every token picks one expert)")
    print(f"  the training loss adds aux_weight * balance = {moe.aux_weight} * {balance:.4f} "
          f"= {moe.aux_weight * balance:.6f}; its gradient flows into the router through P")
    layout = Layout(MODEL, both)
    result2, parity2 = simulate(layout, steps=3, check=True)
    for name, res in (("ep=2", result), ("dp=2 x ep=2", result2)):
        b = res.metrics[0][f"moe{LAYER}.balance"]
        print(f"  simulate({name}) step 0 reports moe{LAYER}.balance = {b:.6f}: "
              f"{'equal' if abs(b - balance) < 1e-5 else 'DIFFERENT'} (psum over dp, ep, sp)")
    for step, (losses, metrics) in enumerate(zip(result2.losses, result2.metrics)):
        where = (f"on every one of the {len(losses)} ranks" if len(set(losses)) == 1
                 else "per rank " + ", ".join(f"{v:.6f}" for v in losses))
        print(f"  step {step}: loss {losses[0]:.6f} {where}; balance "
              f"{metrics['moe1.balance']:.4f} (block 1), {metrics['moe3.balance']:.4f} (block 3)")
    for p in (parity, parity2):
        assert p is not None
        if not p.ok:
            raise SystemExit("a sharded layout does NOT match the single-device model")
    print(f"ep=2 and dp=2 x ep=2 match the single-device model (worst gradient error "
          f"{max(parity.worst_err, parity2.worst_err):.1e})")

    header("(e) The schedule: 2 + 2 all-to-alls per MoE layer")
    for m in (mesh, both):
        recs = schedules.get(m) or explain(Layout(MODEL, m)).schedules.ranks[0]
        T = B * S // (m.dp * m.ep)
        C = moe.capacity(T)
        payload = moe.all_to_all_payload(T)
        print(f"{m!r}: T = {T} tokens per rank, C = ceil({cf0} * {k} * {T} / {X}) = {C}; "
              f"buffer ({X}, {C}, {E}) fp32 = {payload:,} B")
        for layer in (1, 3):
            mine = [r for r in recs if r.site.startswith(f"blocks.{layer}.mlp") and r.axis == "ep"
                    and r.op.value != "all_reduce"]
            shown = [f"{r.phase.value} {r.op.value} {list(r.shape)} {r.bytes:,} B" for r in mine]
            print(f"  blocks.{layer}.mlp over ep: " + "; ".join(shown))
            want = ([("forward", "all_to_all", payload)] * 2
                    + [("backward", "all_to_all", payload)] * 2)
            if [(r.phase.value, r.op.value, r.bytes) for r in mine] != want:
                raise SystemExit(f"blocks.{layer}.mlp: expected 2 forward + 2 backward "
                                 f"all_to_all over ep of {payload:,} B each")
            print(f"    = 2 forward + 2 backward all-to-alls of {payload:,} B, wire "
                  f"(ep-1)/ep * S = {(m.ep - 1) * payload // m.ep:,} B each")
        formula = cf0 * k * T * E * 4 * (m.ep - 1) / m.ep
        print(f"  DESIGN.md's estimate cf*k*T*h*4*(ep-1)/ep = {cf0}*{k}*{T}*{E}*4*{m.ep - 1}/{m.ep}"
              f" = {formula:,.0f} B per all-to-all "
              f"({'=' if formula == (m.ep - 1) * payload / m.ep else '<'} the recorded "
              f"{(m.ep - 1) * payload // m.ep:,} B: the buffer has C slots per expert, "
              "filled or not, and C is rounded up)")
        dense = [r for r in recs if r.op.value == "all_to_all"
                 and not r.site.startswith(("blocks.1.mlp", "blocks.3.mlp"))]
        print(f"  all-to-alls outside the MoE layers: {len(dense)}")


if __name__ == "__main__":
    main()
