"""Lesson 09: reading a schedule: every collective, where it comes from, what it costs.

``explain`` traces one training step on meta tensors (no memory, any world size) and
records every collective one rank issues, in order. This lesson reads that list for
gpt-tiny, first on Mesh(dp=2, tp=2), then pipelined on Mesh(pp=2, dp=2, tp=2) with 2
microbatches, and recomputes its byte counts from the formulas by hand. You will see:

  (a) the columns of a schedule row (index, phase, site, op, axis, group, shape, bytes,
      wire bytes), and where each collective comes from, grouped by site: the vocab-
      parallel embedding, Megatron's g (forward, row-parallel outputs) and f (backward,
      block inputs), the vocab-parallel loss's three all-reduces, the head's input, and
      the dp gradient all-reduce at the end: the gradients packed into buckets, as DDP
      does (``--bucket-kb 0`` would show one row per parameter);
  (b) per-axis wire bytes, recorded vs ``ex.analytic``, and the dp and tp totals
      recomputed here from lowering/analytic.py's formulas;
  (c) the pipeline: sends and receives at the stage boundary, the all-reduce over pp of
      the parameters every stage holds, and how per-microbatch terms multiply by m;
  (d) the same from the command line: ``--json`` (with a jq-like extraction in Python)
      and ``--terms``.

Run it:  python tutorials/09_reading_a_schedule.py
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import re

from rich.console import Console

import shardlang as sl
from lowering.cli import main as shardlang
from lowering.printer import print_schedule
from lowering.run import Explained, Layout, explain
from lowering.printer import human
from lowering.run.registry import resolve
from lowering.schedule import Op, Record, totals, wire_bytes

MODEL = resolve("gpt-tiny")
F32 = 4
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def check(what: str, got: float, want: float) -> None:
    ok = abs(got - want) < 1e-6
    print(f"  {what}: recorded {got:,.0f} B, by hand {want:,.0f} B: "
          f"{'equal' if ok else 'NOT EQUAL'}")
    if not ok:
        raise SystemExit(f"{what}: the schedule and the formula disagree")


def kind_of(rec: Record, params: set[str]) -> str:
    """Where a collective comes from, read off its site (and phase, op and axis)."""
    fwd = rec.phase.value == "forward"
    if rec.site.startswith("pipeline"):
        return f"pipeline boundary ({rec.op.value})"
    if rec.site.startswith("grads "):
        return "a bucket of parameters' gradients, averaged over dp"
    if rec.site.split(" ")[0] in params:
        return ("shared parameter's gradient, summed over pp" if rec.axis == "pp"
                else "parameter's gradient, averaged over dp")
    if rec.site == "loss":
        return "vocab-parallel loss (max, sum-exp, target logit)"
    if rec.site == "(model)":
        return ("vocab-parallel embedding: sum of the tp halves' lookups" if fwd else
                "vocab-parallel head: its input's gradient (f)")
    if re.fullmatch(r"blocks\.\d+", rec.site):
        return ("row-parallel outputs attn.o, mlp.down (g)" if fwd else
                "block inputs of attn and mlp (f)")
    return "other"


def bucket_names(site: str, params: list) -> list[str]:
    """The parameters a gradient bucket's site ``grads FIRST .. LAST`` covers: buckets take
    the parameters in reverse order, so FIRST is the later-registered one."""
    names = [p.name for p in params]
    if not site.startswith("grads "):
        return [site] if site in names else []
    first, last = site.removeprefix("grads ").split(" .. ")
    i, j = names.index(first), names.index(last)
    return names[j:i + 1][::-1]


# -- (a) ------------------------------------------------------------------------------------
def section_a() -> Explained:
    mesh = sl.Mesh(dp=2, tp=2)
    header(f"(a) One rank's schedule, gpt-tiny on {mesh!r}")
    ex = explain(Layout(MODEL, mesh), ranks=[0])
    recs = ex.schedules.ranks[0]
    print(f"python -m lowering explain gpt-tiny --mesh dp=2,tp=2 prints rank 0's {len(recs)} "
          "collectives; here are a few rows:")
    pick = [recs[0], recs[1], recs[2], recs[9], recs[12], recs[13], recs[-1]]
    print_schedule(pick, mesh, console=console, title="rows 0, 1, 2, 9, 12, 13 and the last")
    row = recs[1].json(mesh, 0)
    print("Row 1, column by column (Record.json(mesh, rank) gives the same fields):")
    notes = {
        "index": "issue order on this rank: every rank of a group must issue the same sequence",
        "phase": "forward, backward or optimizer (autograd's backward counts as backward)",
        "site": "the deepest module running when it was issued (or a name: loss, a parameter)",
        "op": "the collective: all_reduce, all_gather, reduce_scatter, send, recv, ...",
        "axis": "the mesh axis its group spans",
        "group": "the ranks of this rank's group on that axis (rank 0's here)",
        "shape": "the payload's shape on this rank (local, not global)",
        "bytes": "the payload: numel * element size",
        "wire_bytes": "what this rank sends: ring all-reduce 2(n-1)/n * bytes (n = group size)",
    }
    for key, note in notes.items():
        print(f"  {key:10} = {str(row[key]):14} {note}")
    print(f"The group depends on the rank: rank 3's tp group is {list(mesh.group(3, 'tp'))}, its "
          f"dp group {list(mesh.group(3, 'dp'))}.")

    params = {p.name for p in ex.plan.params}
    by: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    for r in recs:
        by[(r.phase.value, r.op.value, r.axis, kind_of(r, params))] += 1
    print("\nEvery collective of rank 0, by where it comes from (the site column):")
    for (phase, op, axis, kind), n in by.items():
        print(f"  {phase:8} {n:2} x {op} over {axis}: {kind}")
    n_layers = MODEL.build(meta=True).config.n_layer
    dp = [r for r in recs if r.axis == "dp"]
    local = {p.name: math.prod(p.shape) * p.dtype.itemsize
             // math.prod(mesh.axis_size(a) for a in p.spec.mesh_axes) for p in ex.plan.params}
    first_dp = recs.index(dp[0])
    print(f"\n- (model) forward: wte is split over tp along the vocabulary; each tp rank looks up")
    print("  the tokens in its half (zeros elsewhere) and one all-reduce sums the halves.")
    print(f"- blocks.i: {n_layers} blocks x 2 forward all-reduces: attn.o and mlp.down are row-"
          "parallel, each tp rank")
    print("  holds a partial sum (lesson 07), summed before the residual add: Megatron's g.")
    print("  Backward, the mirror image f: q/k/v and mlp.up are column-parallel, so the gradient")
    print("  of their (replicated) input is partial over tp and summed at the block's input.")
    print("  The site is the block, not attn.o: the collective runs where the block consumes it.")
    print("- loss: the logits are split over tp along the vocabulary; cross-entropy needs the")
    print("  max, the sum of exponentials and the target's logit over the whole vocabulary:")
    print("  three all-reduces of b*s values (shapes [4, 1, 32]: 4 rows, 32 positions).")
    print("- (model) backward: lm_head (tied to wte) is vocab-parallel; the gradient of its")
    print("  input is partial over tp, summed once (f for the head).")
    covered = [n for r in dp for n in bucket_names(r.site, ex.plan.params)]
    print(f"- row {first_dp}{'' if len(dp) == 1 else f'-{len(recs) - 1}'}: after the backward, "
          f"the gradients averaged over dp, packed into {len(dp)} bucket(s) as DDP packs them")
    print("  (its first bucket closes at 1 MiB, the others at 25 MiB; each goes out as soon as "
          "its last")
    print("  gradient is ready, while the backward runs on). The site names the bucket's first "
          "and last")
    print(f"  parameter, the shape is the flattened local blocks: {dp[0].shape[0]:,} values = "
          f"the {len(covered)} parameters' blocks")
    print("  (wte.weight's is [128, 64]: half of (256, 64) over tp). `--bucket-kb 0` gives one "
          "row per parameter.")
    ok = (by[("forward", "all_reduce", "tp", "row-parallel outputs attn.o, mlp.down (g)")]
          == 2 * n_layers
          and by[("backward", "all_reduce", "tp", "block inputs of attn and mlp (f)")]
          == 2 * n_layers
          and by[("forward", "all_reduce", "tp",
                  "vocab-parallel loss (max, sum-exp, target logit)")] == 3
          and sorted(covered) == sorted(params)
          and all(r.bytes == sum(local[n] for n in bucket_names(r.site, ex.plan.params))
                  and r.phase.value == "backward" for r in dp)
          and all(r.axis == "tp" for r in recs[:first_dp]) and "other" not in
          {k for *_, k in by})
    print(f"counts as described, every dp payload = its parameters' local bytes: "
          f"{'yes' if ok else 'NO'}")
    if not ok:
        raise SystemExit("the schedule is not what the lesson says")
    return ex


# -- (b) ------------------------------------------------------------------------------------
def section_b(ex: Explained) -> None:
    mesh = ex.plan.mesh
    header(f"(b) Per-axis wire bytes: recorded vs analytic vs by hand ({mesh!r})")
    recs = ex.schedules.ranks[0]
    rec = totals(recs)["axis"]
    for axis, vol in ex.analytic.items():
        got = rec[axis]["wire_bytes"]
        print(f"{axis}: {rec[axis]['count']} collectives, recorded {got:,.0f} B, "
              f"ex.analytic['{axis}'].wire_bytes {vol.wire_bytes:,.0f} B "
              f"({len(vol.terms)} terms): {'equal' if got == vol.wire_bytes else 'NOT EQUAL'}")
        print(f"    formula: {vol.formula}")
        if got != vol.wire_bytes:
            raise SystemExit(f"{axis}: recorded and analytic differ")

    print("\nBy hand, from lowering/analytic.py's docstring:")
    n = mesh.dp
    local = [math.prod(p.shape) * p.dtype.itemsize
             // math.prod(mesh.axis_size(a) for a in p.spec.mesh_axes) for p in ex.plan.params]
    dp_hand = sum(2 * (n - 1) / n * b for b in local)
    print(f"dp: sum over the {len(local)} parameters of 2(n-1)/n * local bytes, n = {n}; local "
          "bytes = numel * 4 / (ways the spec splits it)")
    print(f"    = {2 * (n - 1) / n:g} * {sum(local):,} B (lm_head is wte: tied, reduced once)")
    check("dp", rec["dp"]["wire_bytes"], dp_hand)

    model = MODEL.build(meta=True)
    cfg = model.config
    batch, seq = Layout(MODEL, mesh).shapes(model)
    b, s, e, t = batch // mesh.dp, seq, cfg.n_embd, mesh.tp
    row = [p.name for p in ex.plan.params if p.role.value == "row-parallel"]
    ar = 2 * (t - 1) / t
    terms = {
        f"{len(row)} row-parallel linears x 2 (g fwd + f bwd) x b*s*out*4":
            len(row) * 2 * b * s * e * F32,
        "vocab-parallel embedding fwd, b*s*embed*4": b * s * e * F32,
        "vocab-parallel head input bwd, b*s*embed*4": b * s * e * F32,
        "vocab-parallel loss, 3 x b*s*4": 3 * b * s * F32,
    }
    print(f"tp: every term an all-reduce, 2(n-1)/n = {ar:g} times its payload; b = {batch}/dp = "
          f"{b} rows per rank, s = {s}, embed = {e}:")
    for what, payload in terms.items():
        print(f"    {what:58} {payload:>9,} B")
    print(f"    row-parallel: {', '.join(row[:2])}, ... (attn.o and mlp.down of {cfg.n_layer} "
          "blocks; out = embed for both)")
    check("tp", rec["tp"]["wire_bytes"], ar * sum(terms.values()))
    print("On 2 ranks an all-reduce sends exactly its payload (2*1/2 = 1); on tp=4 it would "
          "send 1.5x.")


# -- (c) ------------------------------------------------------------------------------------
def section_c() -> None:
    m = 2
    mesh = sl.Mesh(pp=2, dp=2, tp=2)
    layout = Layout(MODEL, mesh, microbatches=m)
    header(f"(c) The pipeline: gpt-tiny on {mesh!r}, {m} microbatches, 1F1B")
    stage = mesh.size // mesh.pp
    ex = {r: explain(layout, ranks=[r]) for r in (0, stage)}
    plan = ex[0].plan
    model = MODEL.build(meta=True)
    batch, seq = layout.shapes(model)
    b, e = batch // m // mesh.dp, model.config.n_embd
    print(f"batch {batch} = the preset's {MODEL.batch} per microbatch x {m}; each microbatch "
          f"gives every rank b = {batch}/{m}/dp = {b} rows.")
    for r in (0, stage):
        recs = ex[r].schedules.ranks[r]
        layers = [i for i in range(plan.pipeline.n_layers) if any(x.site == f"blocks.{i}" for x in recs)]
        print(f"\n{'first' if r == 0 else 'last'} stage, rank {r} (pp={r // stage}): layers "
              f"{layers}, {len(recs)} collectives; its pp rows (#, phase, op, group, shape, "
              "bytes, wire, site):")
        for x in recs:
            if x.axis == "pp":
                j = x.json(mesh, r)
                print(f"  {x.index:2} {x.phase.value:8} {x.op.value:10} {str(j['group']):6} "
                      f"{str(list(x.shape)):12} {human(x.bytes):>6} {human(x.wire_bytes):>6}  "
                      f"{x.site}")
    r0, r4 = ex[0].schedules.ranks[0], ex[stage].schedules.ranks[stage]
    block = b * seq * e * F32
    print(f"The boundary carries one microbatch of the hidden state, this rank's block: b*s*embed"
          f"*4 = {b}*{seq}*{e}*4 = {block:,} B.")
    print(f"Forward rank 0 sends it to rank {stage} (its pp peer), once per microbatch; backward"
          " the gradient comes back.")
    print("A send costs its payload on the wire, a receive 0 (the sender paid). Rank 0 sends "
          f"{m} activations,")
    print(f"rank {stage} sends {m} gradients: both {m} x {block:,} B of boundary traffic.")
    shared = [p for p in plan.params if not p.name.startswith(f"{plan.pipeline.stack}.")]
    local = {p.name: math.prod(p.shape) * F32 // math.prod(
        mesh.axis_size(a) for a in p.spec.mesh_axes) for p in shared}
    print(f"Parameters outside the layer stack ({', '.join(local)})")
    print("live on every stage (the embedding runs on each chunk, on dummy tokens past the first:")
    print("hence the '(model)' forward all-reduce on rank 4 too): their gradients are summed over")
    print(f"pp once per step, {sum(local.values()):,} B, as Megatron does for a tied embedding.")

    def ring(n: int) -> float:  # an all-reduce over n ranks sends 2(n-1)/n of its payload
        return 2 * (n - 1) / n

    def hand(rank: int) -> dict[str, float]:
        first, last = rank < stage, rank >= stage
        n_mine = plan.pipeline.n_layers // mesh.pp
        per_mb = 1 + 2 * 2 * n_mine + (1 if last else 0)   # emb, 2 g + 2 f per layer, head
        tp = ring(mesh.tp) * m * (per_mb * b * seq * e * F32 + (3 * b * seq * F32 if last else 0))
        pp = m * block + ring(mesh.pp) * sum(local.values())   # sends (or receives: 0) + shared
        held = [p for p in plan.params if p.name.startswith(f"{plan.pipeline.stack}.")
                and int(p.name.split(".")[1]) // n_mine == rank // stage]
        held += [p for p in plan.params if (first and p.name in plan.pipeline.pre)
                 or (last and p.name in plan.pipeline.post)]
        dp = ring(mesh.dp) * sum(math.prod(p.shape) * F32 // math.prod(
            mesh.axis_size(a) for a in p.spec.mesh_axes) for p in held)
        return {"tp": tp, "pp": pp, "dp": dp}

    print("\nPer-microbatch terms multiply by m; per-step ones do not:")
    print(f"  tp, per microbatch: embedding 1 + {plan.pipeline.n_layers // mesh.pp} layers x 4 (g, g, f, f)"
          " + on the last stage the head's f")
    print("      and the loss's 3; all of it x m, on b = batch/m/dp rows")
    print("  pp: m sends (or receives) each way + the shared parameters' all-reduce once")
    print("  dp: each stage's own parameters' gradients (its layers; the embeddings on the first,")
    print("      the final norm and the tied head on the last), once per step (accumulated over")
    print("      the microbatches)")
    for r, recs in ((0, r0), (stage, r4)):
        rec = totals(recs)["axis"]
        want = hand(r)
        print(f"rank {r}:")
        for axis in ("tp", "pp", "dp"):
            analytic = ex[r].analytic[axis].wire_bytes
            print(f"  {axis}: {rec[axis]['count']:2} collectives, recorded "
                  f"{rec[axis]['wire_bytes']:>9,.0f} B, analytic {analytic:>9,.0f} B, by hand "
                  f"{want[axis]:>9,.0f} B")
            if not rec[axis]["wire_bytes"] == analytic == want[axis]:
                raise SystemExit(f"rank {r} {axis}: recorded, analytic and by hand disagree")
    print("All three agree on both stages. The last stage does more tp work (head and loss);")
    print("the first reduces wpe's gradient over dp, the last ln_f's instead.")
    order = {r: " ".join(("F" if x.phase.value == "forward" else "B") + x.site.split()[-1][:-1]
                         for x in recs if x.axis == "pp" and x.site.startswith("pipeline"))
             for r, recs in ((0, r0), (stage, r4))}
    print(f"Boundary traffic in issue order (F/B + microbatch): rank 0: {order[0]}; rank {stage}: "
          f"{order[stage]}.")
    print("The last stage alternates forward and backward (1F1B): it starts microbatch 0's")
    print("backward before microbatch 1's forward, so at most one activation is in flight there.")
    if order[stage] != "F0 B0 F1 B1" or order[0] != "F0 F1 B0 B1":
        raise SystemExit("the boundary traffic is not in 1F1B order")


# -- (d) ------------------------------------------------------------------------------------
def section_d() -> None:
    header("(d) The same from the command line: --json and --terms")
    argv = ["explain", "gpt-tiny", "--mesh", "dp=2,tp=2", "--json"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = shardlang(argv)
    d = json.loads(buf.getvalue())
    print(f"$ python -m lowering {' '.join(argv)}   (exit {code}): one JSON object with keys")
    print(f"  {list(d)}")
    rows = d["ranks"]["0"]
    print(f"ranks['0'] is the schedule ({len(rows)} rows as in (a)); the first:\n  {rows[0]}")

    print("\njq '[.ranks[\"0\"][] | select(.phase==\"backward\" and .axis==\"tp\") | .site]'")
    bwd_tp = [x["site"] for x in rows if x["phase"] == "backward" and x["axis"] == "tp"]
    print(f"  {bwd_tp}")
    print("jq '.totals.axis | map_values(.wire_bytes)'")
    tot = {a: v["wire_bytes"] for a, v in d["totals"]["axis"].items()}
    print(f"  {tot}")
    print("jq '.analytic | map_values(.wire_bytes)'")
    ana = {a: v["wire_bytes"] for a, v in d["analytic"].items()}
    print(f"  {ana}")
    print("jq '[.ranks[\"0\"][] | select(.axis==\"dp\") | .wire_bytes] | add'")
    dp_sum = sum(x["wire_bytes"] for x in rows if x["axis"] == "dp")
    print(f"  {dp_sum}")
    print("jq '.analytic.tp.terms[] | [.what, .count, .payload, .wire_bytes]'   (what --terms "
          "prints as tables)")
    for t in d["analytic"]["tp"]["terms"][:3]:
        print(f"  {[t['what'], t['count'], t['payload'], t['wire_bytes']]}")
    print(f"  ... {len(d['analytic']['tp']['terms'])} terms in all")
    wb = sum(t["count"] * wire_bytes(Op(t["op"]), t["payload"], 2)
             for t in d["analytic"]["tp"]["terms"])
    print(f"sum of count * wire_bytes(op, payload, n=2) over the tp terms: {wb:,.0f} B = "
          f"analytic tp {ana['tp']:,.0f} B")
    print("\n--terms prints the same terms (without --json) after the per-axis table, one")
    print("table per axis, e.g. 'Analytic terms for tp': term, op, count, payload, wire, and")
    print("a recorded collective that no term covers is listed under 'Not in the formulas'.")
    print("Other flags worth knowing: --rank R or --all-ranks (groups of ranks whose schedules")
    print("agree are printed once), --show NAME (lesson 07's grids), --microbatches, --schedule.")
    ok = (code == 0 and tot == ana and dp_sum == tot["dp"] and wb == ana["tp"]
          and len(bwd_tp) == 9 and bwd_tp[0] == "(model)" and human(tot["tp"]) == "578 KiB")
    if not ok:
        raise SystemExit("the JSON does not say what the lesson says")


def main() -> None:
    ex = section_a()
    section_b(ex)
    section_c()
    section_d()


if __name__ == "__main__":
    main()
