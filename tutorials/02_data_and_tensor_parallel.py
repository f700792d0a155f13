"""Lesson 02: data and tensor parallelism on a small GPT.

Lesson 01 sharded one matmul by hand. Here the whole ``gpt-tiny`` preset (a 4-layer
nanoGPT, width 64) is sharded by choosing only a mesh and rules; the model code never
changes. For each layout you will see the plan (how every parameter is laid out) and
the schedule (the collectives rank 0 issues in one training step), traced in dry mode
on meta tensors, and check the recorded bytes against the textbook formulas:

  (a) DP,   dp=2:        parameters replicated; the gradients all-reduced in buckets
                         (as DDP does), whose payloads add up to the size of the model.
  (b) TP,   tp=2:        Megatron: column-parallel then row-parallel linears, so each
                         transformer block all-reduces twice forward and twice backward.
  (c) FSDP, dp=2:        parameters sharded over dp; all-gather forward, all-gather
                         backward, reduce-scatter the gradient: 3(n-1)/n of the bytes,
                         one collective per layer of the stack (FSDP2's unit).
  (d) DP x TP, dp=2,tp=2: both at once; 3 training steps in simulate mode (all 4 ranks
                         in this process), every rank's loss and gradients compared
                         with the single-device model.

Run it:  python tutorials/02_data_and_tensor_parallel.py
"""

from __future__ import annotations

from collections import Counter

from rich.console import Console

import shardlang as sl
from lowering.printer import print_schedule
from lowering.run import Explained, Layout, explain, simulate
from lowering.run.registry import resolve
from lowering.schedule import Record, totals

MODEL = resolve("gpt-tiny")
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def count(records: list[Record], *, op: str, axis: str, phase: str | None = None) -> int:
    return sum(r.op.value == op and r.axis == axis and phase in (None, r.phase.value)
               for r in records)


def compare_with_formulas(ex: Explained) -> None:
    """Per mesh axis: wire bytes in the recorded schedule vs the analytic formula."""
    recorded = totals(ex.schedules.ranks[0])["axis"]
    for axis, vol in ex.analytic.items():
        got = recorded.get(axis, {"count": 0, "wire_bytes": 0.0})
        match = "exact" if abs(got["wire_bytes"] - vol.wire_bytes) < 1e-6 else "MISMATCH"
        print(f"  {axis}: recorded {got['wire_bytes']:,.0f} B in {got['count']} collectives, "
              f"analytic {vol.wire_bytes:,.0f} B -> {match}")
        print(f"      formula: {vol.formula}")
        if match != "exact":
            raise SystemExit(f"recorded and analytic wire bytes differ on {axis}")


def main() -> None:
    model = MODEL.build(meta=True)  # shapes only: no memory, no compute
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, seq, width = MODEL.batch, MODEL.default_seq(model), model.config.n_embd
    print(f"{MODEL.name}: {n_params:,} parameters = {param_bytes:,} B in fp32; "
          f"batch {batch}, seq {seq}, width {width}")

    header("(a) Data parallelism: Mesh(dp=2)")
    ex = explain(Layout(MODEL, sl.Mesh(dp=2), sl.Rules.default()))
    recs = ex.schedules.ranks[0]
    placements = Counter(str(p.placements) for p in ex.plan.params)
    print(f"placements of the {len(ex.plan.params)} parameters: {dict(placements)}")
    print("Every rank holds the whole model and half of the batch; after backward each")
    print("gradient is averaged over dp. As DDP does, the gradients are packed into buckets")
    print("(the first closes at 1 MiB, the rest at 25 MiB), each all-reduced as soon as its")
    print("last gradient is ready while the backward runs on; gpt-tiny's fit in one:")
    grads = [r for r in recs if r.op.value == "all_reduce" and r.axis == "dp"]
    payload = sum(r.bytes for r in grads)
    phases = ", ".join(sorted({r.phase.value for r in grads}))
    print(f"  {len(grads)} gradient all-reduce(s) over dp (phase: {phases}), "
          f"payloads sum to {payload:,} B; site {grads[0].site!r}")
    per_param = explain(Layout(MODEL, sl.Mesh(dp=2), sl.Rules.default(), bucket_kb=0))
    n_alone = sum(r.axis == "dp" for r in per_param.schedules.ranks[0])
    print(f"  with bucket_kb=0 (--bucket-kb 0): {n_alone} all-reduces, one per parameter, "
          "the same bytes")
    print(f"  = {n_params:,} parameters * 4 B = {param_bytes:,} B: "
          f"{'equal' if payload == param_bytes else 'NOT EQUAL'}")
    compare_with_formulas(ex)

    header("(b) Tensor parallelism: Mesh(tp=2)")
    ex = explain(Layout(MODEL, sl.Mesh(tp=2), sl.Rules.default()))
    recs = ex.schedules.ranks[0]
    print("The plan of the embedding and block 0 (blocks 1-3 are the same):")
    for p in ex.plan.params:
        if p.name.startswith(("wte", "blocks.0.")) and "tp" in p.spec.mesh_axes:
            print(f"  {p.name:26} {str(p.shape):10} {p.spec!r:16} {str(p.placements):18} "
                  f"{p.role.value}")
    roles = Counter(p.role.value for p in ex.plan.params)
    print(f"roles over the whole model: {dict(roles)}")
    print_schedule(recs, sl.Mesh(tp=2), console=console,
                   title=f"Schedule of rank 0 on Mesh(tp=2): {len(recs)} collectives")
    expect = batch * seq * width * 4
    print(f"Per transformer block (activation (b, s, h) = ({batch}, {seq}, {width}) fp32 "
          f"= {expect:,} B):")
    for site in sorted({r.site for r in recs if r.site.startswith("blocks.")}):
        mine = [r for r in recs if r.site == site]
        fwd = count(mine, op="all_reduce", axis="tp", phase="forward")
        bwd = count(mine, op="all_reduce", axis="tp", phase="backward")
        sizes = {r.bytes for r in mine}
        print(f"  {site}: {fwd} forward + {bwd} backward all-reduces over tp, "
              f"payload {sizes} B {'= b*s*h*4' if sizes == {expect} else '!= b*s*h*4'}")
    others = Counter((r.site, r.phase.value, str(list(r.shape))) for r in recs
                     if not r.site.startswith("blocks."))
    print("Outside the blocks, recorded:")
    for (site, phase, shape), k in others.items():
        print(f"  {site}: {k} {phase} all-reduce(s) of shape {shape}")
    print("and what the analytic model says they are:")
    for term in ex.analytic["tp"].terms:
        if not term.what.startswith("blocks."):
            print(f"  {term.count} x {term.what} ({term.payload:,} B)")
    print("Why 2 + 2: attention and MLP each begin with a column-parallel linear and end")
    print("with a row-parallel one. Megatron's 'f' before the column-parallel linear is the")
    print("identity forward and an all-reduce backward; 'g' after the row-parallel linear")
    print("is an all-reduce forward and the identity backward (lesson 01, cases 2 and 3).")
    compare_with_formulas(ex)

    header("(c) Fully sharded data parallelism: Mesh(dp=2), fsdp=True")
    ex = explain(Layout(MODEL, sl.Mesh(dp=2), sl.Rules.default(), fsdp=True))
    recs = ex.schedules.ranks[0]
    sharded = sum(p.fsdp_dim is not None for p in ex.plan.params)
    print(f"{sharded} of {len(ex.plan.params)} parameters are sharded over dp, e.g.:")
    for p in ex.plan.params[:3]:
        print(f"  {p.name:20} {str(p.shape):10} placements {p.placements}, "
              f"fsdp dim {p.fsdp_dim}")
    # FSDP2's unit: each layer of the stack (blocks.i) is gathered in one collective, its
    # parameters laid end to end, and outside the stack each module's own parameters
    # (ln_f's weight and bias); a parameter alone where it is its module's only one
    # (wpe) or tied (the lm_head.weight is wte.weight: gathered once per forward by wte,
    # re-gathered by lm_head). Each unit: gathered forward, re-gathered before its
    # backward, its gradients reduce-scattered.
    outside: dict[str, set[int]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        own = [p for p in mod.parameters(recurse=False)]
        if own and not name.startswith("blocks.") and not any(
                id(p) in seen for seen in outside.values() for p in own):
            outside[name] = {id(p) for p in own}
    units = len(model.blocks) + len(outside)
    ok = all(count(recs, op=op, axis="dp", phase=phase) == units
             for op, phase in (("all_gather", "forward"), ("all_gather", "backward"),
                               ("reduce_scatter", "backward")))
    print(f"per unit ({len(model.blocks)} layers of the stack, {len(outside)} outside it: "
          f"{', '.join(outside)}): 1 all-gather forward, 1 all-gather backward, "
          f"1 reduce-scatter: {'yes' if ok else 'NO'}")
    layer = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    gather = next(r for r in recs if r.axis == "dp" and r.site == "blocks.0")
    print(f"  blocks.0's gather carries {gather.bytes:,} B = its "
          f"{len(list(model.blocks[0].parameters()))} parameters' {layer:,} B: "
          f"{'equal' if gather.bytes == layer else 'NOT EQUAL'}")
    unique = list(model.named_parameters())
    psi = sum(p.numel() * p.element_size() for _, p in unique)
    print(f"  {len(unique)} parameters (lm_head.weight is wte.weight: counted once), "
          f"psi = {psi:,} B")
    n = ex.plan.mesh.dp
    wire = totals(recs)["axis"]["dp"]["wire_bytes"]
    print(f"  3(n-1)/n * psi = 3*{n - 1}/{n} * {psi:,} = {3 * (n - 1) / n * psi:,.0f} B; "
          f"recorded {wire:,.0f} B")
    compare_with_formulas(ex)

    header("(d) Both: Mesh(dp=2, tp=2), trained in simulate mode")
    layout = Layout(MODEL, sl.Mesh(dp=2, tp=2), sl.Rules.default())
    ex = explain(layout)
    recs = ex.schedules.ranks[0]
    for axis in ("dp", "tp"):
        print(f"  {axis}: {count(recs, op='all_reduce', axis=axis)} all-reduces")
    act = next(r for r in recs if r.axis == "tp" and r.site.startswith("blocks."))
    bucket = next(r for r in recs if r.axis == "dp")
    print(f"  a tp all-reduce now carries {list(act.shape)}: batch {batch} / dp "
          f"{layout.mesh.dp} = {act.shape[0]} sequences per dp group")
    print(f"  the dp bucket carries this rank's tp blocks of the gradients: "
          f"{bucket.shape[0]:,} values of the model's {n_params:,} (the tp-split weights "
          "halved)")
    compare_with_formulas(ex)
    result, parity = simulate(layout, steps=3, check=True)
    assert parity is not None
    for step, losses in enumerate(result.losses):
        print(f"  step {step}: loss per rank " + ", ".join(f"{v:.6f}" for v in losses))
    for line in parity.lines:
        print(f"  {line}")
    if not parity.ok:
        raise SystemExit("the sharded model does NOT match the single-device model")
    print(f"every one of the {layout.mesh.size} ranks matches the single-device model "
          f"(worst gradient error {parity.worst_err:.1e})")


if __name__ == "__main__":
    main()
