"""Lesson 05: pipeline parallelism and its schedules.

Lessons 02-04 split every layer's tensors. A pipeline splits the model the other way:
the stack of layers is cut into consecutive groups, one per pipeline rank (mesh axis
``pp``), and the hidden state travels from rank to rank with point-to-point sends. A
whole batch would leave all but one rank idle, so the batch is cut into m microbatches
that follow each other through the pipe. What a rank does, and when, is the schedule;
the idle time it cannot avoid is the bubble. You will see:

  (a) what a pipeline is: gpt-tiny marks its layer stack once with the logical axis
      ``layers``; on Mesh(pp=2) and Mesh(pp=4) each rank holds a run of layers, the
      first also the embedding, the last the head and the loss;
  (b) GPipe, 1F1B and interleaved 1F1B (v=2) on pp=4, m=8 as Gantt charts: their
      bubbles, theory next to the unit-time timeline, and how many microbatches'
      activations each rank keeps alive (GPipe: m; 1F1B: at most p);
  (c) how the bubble falls with more microbatches, m = 1..16 on pp=4;
  (d) the real thing: the sends and receives gpt-tiny records on Mesh(pp=2) with 1F1B
      and m=4, checked against microbatch*seq*width*4 bytes, and one training step in
      simulate mode that matches one device.

Parts (b) and (c) only compute with the schedules (``lowering/pipeline.py``, pure data);
(d) traces and runs the model.

Run it:  python tutorials/05_pipeline_schedules.py
"""

from __future__ import annotations

import inspect

from rich.console import Console

import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.plan import (Kind, Pipe, Schedule, actions, bubble_of, bubble_theory,
                               gantt_rows, timeline)
from lowering.printer import print_pipeline
from lowering.run.registry import resolve
from models.gpt import GPT

MODEL = resolve("gpt-tiny")
P, M, V = 4, 8, 2                      # pipeline ranks, microbatches, virtual stages in (b)
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def schedules() -> list[tuple[str, Pipe]]:
    return [("gpipe", Pipe(Schedule.GPIPE, P, M)),
            ("1f1b", Pipe(Schedule.ONE_F_ONE_B, P, M)),
            ("interleaved", Pipe(Schedule.INTERLEAVED, P, M, V))]


def in_flight(pipe: Pipe, rank: int) -> int:
    """The most forwards ``rank`` has done whose backward it has not done yet, walking its
    actions in order: each one keeps a (chunk, microbatch)'s activations alive."""
    alive, peak = set(), 0
    for a in actions(pipe, rank):
        if a.kind is Kind.F:
            alive.add((a.chunk, a.microbatch))
            peak = max(peak, len(alive))
        elif a.kind is Kind.B:
            alive.discard((a.chunk, a.microbatch))
    return peak


def section_a() -> None:
    header("(a) What a pipeline is: gpt-tiny's layer stack cut over pp")
    src = [ln.strip() for ln in inspect.getsource(GPT.__init__).splitlines() if '"layers"' in ln]
    print("models/gpt.py marks the stack of blocks once, with the logical axis 'layers':")
    for ln in src:
        print(f"  {ln}")
    print("The default rules map layers -> pp; a mesh with pp > 1 cuts that stack into pp*v")
    print("chunks of consecutive layers, chunk c on pipeline rank c % pp (v = 1 unless the")
    print("schedule is interleaved). The model's forward is not rewritten: each rank runs it")
    print("and skips the layers it does not hold.")
    model = MODEL.build(meta=True)
    for pp, schedule, v in ((2, "1f1b", None), (4, "1f1b", None), (2, "interleaved", 2)):
        plan = Layout(MODEL, sl.Mesh(pp=pp), schedule=schedule, virtual=v).plan(model)
        pipe = plan.pipe
        assert pipe is not None
        print(f"\nMesh(pp={pp}), {schedule}: {plan.pipeline.stack} ({plan.pipeline.n_layers} layers) in "
              f"{pipe.chunks} chunks of {plan.pipeline.n_layers // pipe.chunks} layer(s), "
              f"{pipe.virtual} per rank")
        held = []
        for r in range(pp):
            chunks = pipe.chunks_of(r)
            layers = [list(pipe.layers_of(c, plan.pipeline.n_layers)) for c in chunks]
            held += [i for ls in layers for i in ls]
            extra = (["+ embedding (wte, wpe)"] if r == 0 else []) + \
                (["+ final norm, head and loss"] if pipe.rank_of(pipe.chunks - 1) == r else [])
            print(f"  pp rank {r}: chunks {chunks} -> layers {layers} {' '.join(extra)}".rstrip())
        ok = sorted(held) == list(range(plan.pipeline.n_layers))
        print(f"  every layer on exactly one pipeline rank: {'yes' if ok else 'NO'}")
        if not ok:
            raise SystemExit("the layers are not split across the pipeline ranks")
    print(f"\nUsed before the stack: {sorted(plan.pipeline.pre)};")
    print(f"used after it: {sorted(plan.pipeline.post)} (lm_head.weight is tied to wte.weight).")
    print("The parameters outside the stack live on every pipeline rank (each rank runs the")
    print("model's own forward; a rank that is not first swaps the embedding's output for the")
    print("activation it receives), so their gradients are summed over pp after backward. A")
    print("layer's parameters live on one rank only. What travels between ranks is the")
    print(f"hidden state, (microbatch, seq, width) = (rows, {MODEL.default_seq(model)}, "
          f"{model.config.n_embd}) per microbatch.")


def section_b() -> None:
    header(f"(b) GPipe vs 1F1B vs interleaved 1F1B on pp={P}, m={M} microbatches")
    print("A cell is one stage's forward of one microbatch (F + microbatch); a backward is")
    print("assumed to cost the same (b + microbatch); '..' is idle. Interleaved: a cell is one")
    print(f"chunk's forward, 1/v = 1/{V} of a stage's, and each rank runs v chunks.")
    peaks: dict[str, list[int]] = {}
    for name, pipe in schedules():
        slots = timeline(pipe)
        rows = gantt_rows(pipe, slots)
        theory, scheduled = bubble_theory(pipe), bubble_of(slots, pipe.pp)
        print(f"\n{name} (pp={pipe.pp}, m={pipe.microbatches}, v={pipe.virtual}):")
        for row in rows:
            print(f"  {row}")
        cells = [row.split("|")[1:-1] for row in rows]
        n_f = [sum(c.startswith("F") for c in cs) for cs in cells]
        n_b = [sum(c.startswith("b") for c in cs) for cs in cells]
        idle = [sum(c == ".." for c in cs) for cs in cells]
        print(f"  cells per row: {len(cells[0])}; F cells per rank {n_f}, b cells {n_b} "
              f"(m*v = {pipe.microbatches * pipe.virtual} each), idle {idle}")
        p, m, v = pipe.pp, pipe.microbatches, pipe.virtual
        formula = f"(p-1)/(m+p-1){'/v' if v > 1 else ''} = {p - 1}/{m + p - 1}" + \
            (f"/{v}" if v > 1 else "")
        print(f"  {name} bubble: theory {formula} = {theory:.4f} ({theory:.1%}); "
              f"timeline {scheduled:.4f} ({scheduled:.1%})")
        peaks[name] = [in_flight(pipe, r) for r in range(pipe.pp)]
    print("\nWhy 1F1B has the same bubble as GPipe: in both, every rank idles 2(p-1) = "
          f"{2 * (P - 1)} slots,")
    print("the fill (rank r waits r slots for its first input, the last rank waits p-1 for its")
    print("first gradient to start back) and the drain. 1F1B only reorders the middle: it runs")
    print("a backward as soon as one is possible, and the same fill and drain remain.")
    print("What that buys is memory. A rank must keep a microbatch's activations from its")
    print("forward until its backward. From each rank's action order, the most forwards done")
    print("whose backward is not done yet:")
    print(f"  gpipe activations alive per rank: {peaks['gpipe']} (= m = {M}: all forwards first)")
    print(f"  1f1b activations alive per rank: {peaks['1f1b']} (<= p = {P}: rank r keeps p - r)")
    il = peaks["interleaved"]
    print(f"  interleaved chunk activations alive per rank: {il}; each is 1/v of a stage's,")
    print(f"  so {[x / V for x in il]} stage-equivalents: its longer warm-up keeps a little more"
          " alive than 1F1B")
    if peaks["gpipe"] != [M] * P or peaks["1f1b"] != [P - r for r in range(P)]:
        raise SystemExit("the activation counts differ from GPipe = m, 1F1B = p - rank")
    print("\nWhy interleaving shrinks the bubble: each rank holds v smaller chunks (rank r: chunks")
    print(f"r and r+{P} of {P * V}), so the pipe fills and drains in steps of 1/v of a stage:")
    print("the ideal bubble divides by v. The price: v times more boundaries to cross, so")
    sends = {name: sum(a.kind in (Kind.SEND_F, Kind.SEND_B) for r in range(pipe.pp)
                       for a in actions(pipe, r)) for name, pipe in schedules()}
    print(f"  sends in one step, all ranks: gpipe {sends['gpipe']}, 1f1b {sends['1f1b']} "
          f"(2*m*(p-1) = {2 * M * (P - 1)}), interleaved {sends['interleaved']} "
          f"(2*m*(p*v-1) = {2 * M * (P * V - 1)})")
    il_pipe = schedules()[2][1]
    il_sched = bubble_of(timeline(il_pipe), P)
    exact = (P - 1) / (V * M + P - 1)
    print(f"Be aware: (p-1)/(m+p-1)/v = {bubble_theory(il_pipe):.1%} is the idealised formula, "
          "dividing the whole")
    print(f"fraction by v. torch's ScheduleInterleaved1F1B order, timed here, idles "
          f"{il_sched:.1%}: each rank")
    print(f"idles 2(p-1) = {2 * (P - 1)} chunk slots (1/v of 1F1B's idle time, see the idle "
          "counts above), but")
    print(f"the step is shorter too, so the fraction is (p-1)/(v*m+p-1) = {P - 1}/{V * M + P - 1}"
          f" = {exact:.4f}: "
          f"{'equal to the timeline' if abs(exact - il_sched) < 1e-12 else 'NOT the timeline'}.")
    print("The two agree once m >> p; both are well under 1F1B's bubble.")


def section_c() -> None:
    header(f"(c) The bubble falls with more microbatches (pp={P})")
    print("  m  | theory (p-1)/(m+p-1) | gpipe timeline | 1f1b timeline")
    for m in range(1, 17):
        theory = bubble_theory(Pipe(Schedule.GPIPE, P, m))
        g = bubble_of(timeline(Pipe(Schedule.GPIPE, P, m)), P)
        f = f"{bubble_of(timeline(Pipe(Schedule.ONE_F_ONE_B, P, m)), P):.4f}" if m >= P else "-"
        print(f"  {m:2} | {theory:20.4f} | {g:14.4f} | {f:>13}")
    print(f"m=1 is no pipeline at all: {P - 1} of {P} ranks idle. 1F1B needs m >= p. Halving the")
    print("bubble needs about twice the microbatches once m >> p; 10% or less needs m >= 9(p-1)")
    print(f"= {9 * (P - 1)}. More microbatches means smaller ones, though: each must still keep")
    print("the GPU busy, so the batch (or interleaving) has to grow with p.")


def section_d() -> None:
    m = 4
    header(f"(d) gpt-tiny on Mesh(pp=2), 1F1B, m={m}: the recorded sends and receives")
    layout = Layout(MODEL, sl.Mesh(pp=2), schedule="1f1b", microbatches=m)
    ex = explain(layout, ranks=[0, 1])
    model = MODEL.build(meta=True)
    batch, seq = layout.shapes(model)
    width, rows = model.config.n_embd, batch // m
    print_pipeline(ex.plan, console)
    payload = rows * seq * width * 4
    print(f"batch {batch} = {m} microbatches of {rows} rows (the preset's batch per microbatch)")
    pipe = ex.plan.pipe
    assert pipe is not None
    for r in (0, 1):
        recs = ex.schedules.ranks[r]
        p2p = [x for x in recs if x.op.value in ("send", "recv")]
        print(f"\npp rank {r}: {len(p2p)} sends/receives over pp, in the order it issues them")
        for x in p2p:
            peer = r + x.peer_shift
            way = f"{x.op.value} {'to' if x.op.value == 'send' else 'from'} rank {peer}"
            print(f"  {x.index:2} {x.phase.value:8} {way:16} {x.site:42} {x.shape} {x.bytes:,} B")
        # the recorded order is the 1F1B action order: SEND_F/RECV_B on rank 0, RECV_F/SEND_B on 1
        want = [(a.kind.value.lower().split("_")[0], a.microbatch) for a in actions(pipe, r)
                if not a.kind.compute]
        got = [(x.op.value, int(x.site.rsplit(" ", 1)[1].rstrip(")"))) for x in p2p]
        same = got == want
        print(f"  order (op, microbatch) = actions(pipe, {r})'s sends and receives: "
              f"{'yes' if same else 'NO'}")
        others = [x for x in recs if x not in p2p]
        print(f"  then {len(others)} {sorted({x.op.value for x in others})} over pp of the "
              f"parameters every rank holds: {', '.join(x.site.split()[0] for x in others)}")
        if not same:
            raise SystemExit(f"rank {r}'s sends/receives are not in the 1F1B order")
    print(f"\nboundary 0->1, expected per direction: {m} sends and {m} receives of "
          f"microbatch*seq*width*4 = {rows}*{seq}*{width}*4 = {payload:,} B")
    ok = True
    for what, sender, receiver in (("activation", 0, 1), ("gradient", 1, 0)):
        def count(rank: int, op: str) -> list[int]:
            return [x.bytes for x in ex.schedules.ranks[rank]
                    if x.op.value == op and f"({what}," in x.site]
        sent, recvd = count(sender, "send"), count(receiver, "recv")
        good = len(sent) == len(recvd) == m and set(sent) == set(recvd) == {payload}
        ok &= good
        print(f"  {what + 's':11} rank {sender} -> rank {receiver}: {len(sent)} sends, "
              f"{len(recvd)} receives of {sorted(set(sent + recvd))} B: "
              f"{'equal' if good else 'NOT EQUAL'}")
    if not ok:
        raise SystemExit("the pipeline boundary traffic differs from m sends of b*s*h*4 bytes")
    print("\nOne training step in simulate mode (both ranks in this process), compared with the")
    print("single-device model trained on the same batch:")
    _, parity = simulate(layout, steps=1, check=True)
    assert parity is not None
    for line in parity.lines:
        print(f"  {line}")
    print(f"gpt-tiny on Mesh(pp=2), 1f1b, m={m}: parity ok = {parity.ok}; "
          f"{'the pipelined run matched one device' if parity.ok else 'MISMATCH'}")
    if not parity.ok:
        raise SystemExit("the pipelined run does NOT match the single-device model")


def remember() -> None:
    header("What to remember")
    print("A pipeline cuts the stack the model marked 'layers' into pp (times v) chunks; only")
    print("the hidden state crosses a boundary, m times forward and m times backward, each")
    print("microbatch*seq*width*bytes. The bubble (p-1)/(m+p-1) is the fill and drain: more")
    print("microbatches shrink it, interleaving v chunks per rank divides it by about v for")
    print("v times more sends. GPipe and 1F1B idle equally, but 1F1B keeps at most p")
    print("microbatches of activations alive instead of m, which is why it is the default.")
    print("The schedule changes when work happens, never what is computed: the result is the")
    print("single-device model's.")


def main() -> None:
    section_a()
    section_b()
    section_c()
    section_d()
    remember()


if __name__ == "__main__":
    main()
