"""Lesson 06: hybrid parallelism, from 3D to 5D, on one device.

The earlier lessons took the mesh axes one at a time. Real training runs combine them:
one model, one rules table, and a mesh that names every axis. Here the model is
``gpt-moe-tiny`` (4 layers; blocks 1 and 3 are 4-expert MoE layers) and the rules are
``sl.Rules.default()`` throughout (batch -> (dp, ep), seq -> sp, heads/mlp/vocab -> tp,
experts -> ep, layers -> pp). Only the mesh grows, each axis at size 2, and every
layout is simulated (all its ranks in one process) and compared with the single-device
model. An axis of size 1 simply drops out of a rule, which is why the same rules serve
all three meshes. You will see:

  (a) 3D, Mesh(pp=2, dp=2, tp=2), 8 ranks: the schedules of rank 0 (first stage) and
      of the last stage's first rank, per mesh axis, recorded vs analytic; simulate;
  (b) 4D, add sp=2 (16 ranks): the ring-attention K/V permutes appear on sp, and every
      activation collective on the other axes halves (each rank holds half the tokens);
  (c) 5D, add ep=2 (32 ranks, all five axes): the MoE all-to-alls appear on ep, and
      32 ranks simulated in one process match one device;
  (d) one table: world size, rank 0's collectives per axis, the worst gradient error;
  (e) where each rank sits: the canonical order pp, dp, ep, sp, tp (tp innermost).

Run it:  python tutorials/06_hybrid_5d.py   (about 40 s on 2 CPU cores, 20 s of it the
32-rank simulation in (c))
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time

import torch
from rich.console import Console
from rich.table import Table

import shardlang as sl
from lowering.run import Layout, Parity, explain, simulate
from lowering.run.registry import resolve
from lowering.schedule import Record, totals
from shardlang.mesh import MESH_AXES

MODEL = resolve("gpt-moe-tiny")
RULES = sl.Rules.default()
MESHES = {
    "3D": sl.Mesh(pp=2, dp=2, tp=2),
    "4D": sl.Mesh(pp=2, dp=2, sp=2, tp=2),
    "5D": sl.Mesh(pp=2, dp=2, ep=2, sp=2, tp=2),
}
console = Console(width=120)

# The tensors here are tiny: a second intra-op thread only spins. One thread makes this
# script 2-3x faster on 2 cores.
torch.set_num_threads(1)
# DTensor warns (on stderr) that a psum over (dp, ep, sp) runs as one all-reduce per axis;
# that is exactly what the schedule records, so the warning adds nothing here.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def layout(mesh: sl.Mesh) -> Layout:
    return Layout(model=MODEL, mesh=mesh, rules=RULES, fsdp=False, schedule="1f1b",
                  microbatches=2)


def last_stage_rank(mesh: sl.Mesh) -> int:
    """The first rank of the last pipeline stage: pp = pp-1, every other coordinate 0."""
    return mesh.rank_of({"pp": mesh.pp - 1})


def axes_of(recs: list[Record]) -> list[str]:
    seen = {r.axis for r in recs}
    return [a for a in MESH_AXES if a in seen]


def axis_lines(rank: int, stage: int, recs: list[Record], analytic: dict | None) -> bool:
    """Print rank's collectives per mesh axis (and the analytic volume); True if equal."""
    per_axis = totals(recs)["axis"]
    exact = True
    print(f"rank {rank} (pp stage {stage}):")
    for axis in axes_of(recs):
        t = per_axis[axis]
        ops = collections.Counter(r.op.value for r in recs if r.axis == axis)
        mix = " + ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        line = (f"  {axis}: {int(t['count']):3} collectives, {t['wire_bytes']:>11,.0f} B on "
                f"the wire ({mix})")
        if analytic is not None:
            vol = analytic.get(axis)
            n = sum(term.count for term in vol.terms) if vol else 0
            wire = vol.wire_bytes if vol else 0.0
            same = n == t["count"] and wire == t["wire_bytes"]
            exact &= same
            line += f"; analytic {n}, {wire:,.0f} B -> {'exact' if same else 'MISMATCH'}"
        print(line)
    return exact


def worst_gradient_error(parity: Parity) -> float:
    """The worst gradient error, read from parity's summary line."""
    for line in parity.lines:
        m = re.search(r"worst gradient error (\S+)", line)
        if m:
            return float(m.group(1))
    raise ValueError("parity reported no gradient error")


def run_layout(name: str, *, explained: bool) -> dict[str, object]:
    """Explain (optional) and simulate one layout; print its per-axis schedules."""
    mesh = MESHES[name]
    last = last_stage_rank(mesh)
    print(f"{mesh!r}: {mesh.size} ranks, {mesh.size // mesh.pp} per pipeline stage; "
          f"{MODEL.name}, {RULES!r}")
    schedules: dict[int, list[Record]] = {}
    if explained:
        # explain traces one rank per stage on meta tensors; its analytic volumes are for
        # the first asked-for rank's stage, so ask once per stage
        t0 = time.perf_counter()
        for r in (0, last):
            ex = explain(layout(mesh), ranks=[r])
            schedules[r] = ex.schedules.ranks[r]
            axis_ok = axis_lines(r, r // (mesh.size // mesh.pp), schedules[r], ex.analytic)
            print(f"  -> rank {r}: recorded = analytic on every axis "
                  f"({', '.join(axes_of(schedules[r]))}): {'yes' if axis_ok else 'NO'}")
            if not axis_ok:
                raise SystemExit(f"{mesh!r} rank {r}: the schedule differs from the formulas")
        print(f"(explain: {time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    result, parity = simulate(layout(mesh), steps=1, check=True)
    seconds = time.perf_counter() - t0
    assert parity is not None
    # simulate records step 0's schedule of each stage's first rank: the same as explain's
    recorded = {0: result.stage_records[0], last: result.stage_records[mesh.pp - 1]}
    if explained:
        same = all([x.signature() for x in recorded[r]] == [x.signature() for x in schedules[r]]
                   for r in recorded)
        print(f"simulate recorded the same schedules as explain for ranks 0 and {last}: "
              f"{'yes' if same else 'NO'}")
    else:
        for r in (0, last):
            axis_lines(r, r // (mesh.size // mesh.pp), recorded[r], None)
    losses = result.losses[0]
    where = (f"on every one of the {len(losses)} ranks" if len(set(losses)) == 1
             else "per rank " + ", ".join(f"{v:.6f}" for v in losses))
    worst = worst_gradient_error(parity)
    print(f"simulate({mesh!r}, steps=1): loss {losses[0]:.6f} {where}")
    print(f"{mesh!r} vs one device: {'matched' if parity.ok else 'DIFFERENT'} "
          f"({parity.lines[-1]})")
    print(f"(simulate + single-device check: {seconds:.1f} s)")
    if not parity.ok:
        raise SystemExit(f"{mesh!r} does NOT match the single-device model")
    return {"mesh": mesh, "records": recorded, "parity": parity, "worst": worst}


def shapes() -> dict[str, int]:
    """The sizes the payload formulas below need, from the model's config."""
    cfg = MODEL.build(meta=True).config
    m = 2  # microbatches
    return {"B": MODEL.batch * m, "m": m, "S": cfg.seq_len, "E": cfg.n_embd,
            "H": cfg.n_head, "D": cfg.n_embd // cfg.n_head, "X": cfg.n_experts,
            "k": cfg.top_k, "cf": cfg.capacity_factor}


def local_rows(mesh: sl.Mesh, s: dict[str, int]) -> tuple[int, int]:
    """(rows, tokens per row) of one microbatch that one rank holds."""
    return s["B"] // s["m"] // (mesh.dp * mesh.ep), s["S"] // mesh.sp


def show(recs: list[Record], axis: str, op: str) -> list[Record]:
    mine = [r for r in recs if r.axis == axis and r.op.value == op]
    for r in mine:
        print(f"    {r.phase.value:8} {r.op.value:10} {r.site:22} {str(list(r.shape)):18} "
              f"{r.bytes:,} B")
    return mine


def activation_bytes(runs: dict[str, dict], s: dict[str, int]) -> None:
    """The per-microbatch activation payloads on tp and pp, layout by layout."""
    for name, run in runs.items():
        mesh = run["mesh"]
        b, t = local_rows(mesh, s)
        want = b * t * s["E"] * 4
        recs = run["records"][0]
        tp = sorted({r.bytes for r in recs  # the dense blocks' Megatron all-reduces
                     if r.axis == "tp" and re.fullmatch(r"blocks\.\d+", r.site)})
        pp = sorted({r.bytes for r in recs if r.axis == "pp" and r.op.value == "send"})
        print(f"  {name}: b*s*h*4 = {b}*{t}*{s['E']}*4 = {want:,} B; block all-reduces "
              f"over tp {tp} B, pipeline send {pp} B: "
              f"{'equal' if tp == pp == [want] else 'DIFFERENT'}")
    print("  (the MoE blocks' tp all-reduce carries the expert buffer instead: experts are")
    print("  split over tp too, their rows summed like any row-parallel linear)")


def main() -> None:
    start = time.perf_counter()
    s = shapes()
    print(f"{MODEL.name}: batch {s['B']} (2 microbatches of {s['B'] // s['m']}) x seq {s['S']}, "
          f"width {s['E']}, {s['H']} heads of {s['D']}, {s['X']} experts top-{s['k']} in "
          f"blocks 1 and 3, capacity factor {s['cf']}")
    runs: dict[str, dict] = {}

    header("(a) 3D: Mesh(pp=2, dp=2, tp=2), 8 ranks")
    runs["3D"] = run_layout("3D", explained=True)
    print("Per microbatch, tp all-reduces each dense block's attention and MLP outputs")
    print("(forward) and their inputs' gradients (backward); an MoE block's second one")
    print("carries the expert buffer. The vocab-parallel embedding and head add one each")
    print("way, and the last stage the loss: 3 small all-reduces of b*s values. dp sums the")
    print("gradients of the weights a stage holds. On pp: 2 sends forward and 2 receives")
    print("backward (one per microbatch), then the gradients of the weights both stages")
    print("hold (wte, wpe, ln_f) are summed over pp.")

    header("(b) 4D: add sp=2, 16 ranks: ring attention on sp")
    runs["4D"] = run_layout("4D", explained=True)
    mesh4 = MESHES["4D"]
    b, t = local_rows(mesh4, s)
    print("rank 0's permutes over sp (the K/V ring: sp-1 = 1 step per attention call and")
    print("microbatch, forward and backward):")
    perm = show(runs["4D"]["records"][0], "sp", "permute")
    want = 2 * b * (s["H"] // mesh4.tp) * t * s["D"] * 4
    n_want = 2 * s["m"] * (mesh4.sp - 1) * 2  # 2 layers per stage, m microbatches, fwd+bwd
    ok = len(perm) == n_want and {r.bytes for r in perm} == {want}
    print(f"  {len(perm)} permutes; expected 2 layers * {s['m']} microbatches * (sp-1) * "
          f"(fwd + bwd) = {n_want}, each 2*b*(heads/tp)*(seq/sp)*head_dim*4 = "
          f"2*{b}*{s['H'] // mesh4.tp}*{t}*{s['D']}*4 = {want:,} B: "
          f"{'equal' if ok else 'DIFFERENT'}")
    print("sp splits tokens too, so every replicated weight's gradient is also summed over sp:")
    print("the all-reduces on sp mirror those on dp.")

    header("(c) 5D: add ep=2, 32 ranks, every axis at size 2")
    print("The schedules below come from simulate itself (step 0, each stage's first rank),")
    print("which (a) and (b) showed to equal explain's; all 32 ranks run in this process.")
    runs["5D"] = run_layout("5D", explained=False)
    mesh5 = MESHES["5D"]
    b, t = local_rows(mesh5, s)
    T = b * t
    C = math.ceil(s["cf"] * s["k"] * T / s["X"])
    payload = s["X"] * C * s["E"] * 4
    for r in (0, last_stage_rank(mesh5)):
        print(f"rank {r}'s all-to-alls over ep:")
        a2a = show(runs["5D"]["records"][r], "ep", "all_to_all")
        ok = len(a2a) == 4 * s["m"] and {x.bytes for x in a2a} == {payload}
        print(f"  {len(a2a)} = 4 (dispatch + combine, fwd + bwd) * {s['m']} microbatches for "
              f"the stage's one MoE layer; buffer n_experts*C*h*4 = {s['X']}*{C}*{s['E']}*4 = "
              f"{payload:,} B (T = {b}*{t} = {T} tokens, C = ceil({s['cf']}*{s['k']}*{T}/"
              f"{s['X']}) = {C}): {'equal' if ok else 'DIFFERENT'}")
    print("Rank 0 holds blocks 0-1 (MoE in block 1), rank 16 blocks 2-3 (MoE in block 3).")
    print("Rank 16's order is 1F1B's: the last stage runs microbatch 0's backward before")
    print("microbatch 1's forward; rank 0 runs both forwards first (its warm-up).")
    print("ep also splits the batch (batch -> (dp, ep)), so the dense weights' gradients are")
    print("summed over ep too; the experts' are not: each ep rank owns its own experts.")
    print("Activation payloads per microbatch, b*s*h*4 with this rank's rows and tokens:")
    activation_bytes(runs, s)

    header("(d) One rules table, three meshes: rank 0's collectives per axis")
    table = Table(title="rank 0's collectives in one training step", title_justify="left")
    for col in ("layout", "mesh", "world", *MESH_AXES, "wire bytes", "worst grad error",
                "vs one device"):
        table.add_column(col, justify="left" if col in ("layout", "mesh") else "right",
                         no_wrap=True)
    for name, run in runs.items():
        per = totals(run["records"][0])["axis"]
        wire = sum(v["wire_bytes"] for v in per.values())
        table.add_row(name, str(run["mesh"]), str(run["mesh"].size),
                      *(str(int(per[a]["count"])) if a in per else "-" for a in MESH_AXES),
                      f"{wire:,.0f}", f"{run['worst']:.1e}",
                      "matched" if run["parity"].ok else "DIFFERENT")
    console.print(table)
    growth = [f"{name}: {{{', '.join(axes_of(run['records'][0]))}}}" for name, run in runs.items()]
    print("mesh axes in rank 0's schedule: " + " -> ".join(growth))
    print("Each added axis brings its own collectives (sp: permutes, ep: all-to-alls) and")
    print("leaves the others' counts alone; their activation payloads shrink instead, as each")
    print("rank holds fewer tokens. A token axis also sums gradients (sp's all-reduces mirror")
    print("dp's), so rank 0's wire bytes rise from 3D to 4D; from 4D to 5D they fall, as ep")
    print("halves each rank's tokens and experts. Every layout matches one device to float32")
    print("round-off.")

    header("(e) Where each rank sits: canonical order pp, dp, ep, sp, tp (tp innermost)")
    mesh = mesh5
    print(f"{mesh!r}: rank = (((pp*{mesh.dp} + dp)*{mesh.ep} + ep)*{mesh.sp} + sp)*{mesh.tp} + tp")
    for r in (0, 1, 2, 4, 8, 16, 21, 31):
        c = mesh.coordinate(r)
        print(f"  rank {r:2}: {c}")
    c = mesh.coordinate(21)
    print(f"  e.g. rank 21 = ((({c['pp']}*2 + {c['dp']})*2 + {c['ep']})*2 + {c['sp']})*2 + "
          f"{c['tp']} = {mesh.rank_of(c)}")
    roundtrip = all(mesh.rank_of(mesh.coordinate(r)) == r for r in range(mesh.size))
    print(f"rank_of(coordinate(r)) == r for all {mesh.size} ranks: {'yes' if roundtrip else 'NO'}")
    print("rank 0's group along each axis (the ranks it talks to on that axis):")
    for axis in reversed(MESH_AXES):
        g = mesh.group(0, axis)
        print(f"  {axis}: {list(g)} (stride {g[1] - g[0]})")
    print("tp is innermost: its partners are neighbouring ranks, i.e. GPUs of one node on")
    print("NVLink, because tp all-reduces sit on the critical path of every layer. sp and ep")
    print("come next (a permute or all-to-all per layer), dp after them (one gradient sum per")
    print("step, overlappable with backward), and pp outermost: a stage talks to the next")
    print("stage only by point-to-point sends, which tolerate the slowest links.")

    header("What to remember")
    print("* One model and one rules table serve every mesh: an axis of size 1 drops out of a")
    print("  rule, so growing from 3D to 5D is a change of Mesh(...), not of the model.")
    print("* Each axis brings its own collectives: tp all-reduces, dp/sp/ep gradient sums, sp")
    print("  K/V permutes, ep all-to-alls, pp sends; explain lists them per rank, and they")
    print("  equal the analytic formulas.")
    print("* Adding a token axis (sp, ep) leaves the counts on other axes alone and shrinks")
    print("  their activation payloads (each rank holds fewer tokens), but adds a gradient sum.")
    print("* simulate runs every rank in one process: 32 ranks of a 5D layout match one device.")
    print("* Ranks are numbered pp, dp, ep, sp, tp with tp innermost: the chattiest axis gets")
    print("  the nearest neighbours.")
    print(f"\n(total time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
