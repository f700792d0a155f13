"""Lesson 07: rank-local debugging: who holds what, and is it right?

A sharded program is eight programs at once. When a loss goes wrong you want to look at
one rank's tensor and know which piece of the global tensor it is, then check that
piece against the single-device model. ``lowering.debug`` does both without a cluster:
simulate mode runs all 8 ranks of gpt-tiny on Mesh(dp=2, sp=2, tp=2) in this process.
You will see:

  (a) ``show_sharding``: which rank holds which block of a column-parallel weight
      (blocks.0.attn.q.weight), a row-parallel one (blocks.0.mlp.down.weight) and an
      activation (the output of blocks.0.attn, found by ``sharding_of``), Partial over tp;
  (b) ``inspect`` + ``print_inspection``: every rank's local value of blocks.0.mlp.up's
      output, and which ranks hold identical tensors (replicas) and which do not;
  (c) a rank checked by hand: the single-device model's full activation, sliced with
      ``blocks(...)[5].ranges``, equals rank 5's local tensor; a Partial value is no
      slice: the tp peers' values must be summed first;
  (d) the backward view: the gradient arriving at blocks.0.attn on every rank, one line
      each, checked against the single-device gradient (one backward on one device).

Run it:  python tutorials/07_rank_local_debugging.py
The CLI does the same:  python -m lowering explain gpt-tiny --mesh dp=2,sp=2,tp=2
  --show blocks.0.attn   and   python -m lowering simulate gpt-tiny --mesh dp=2,sp=2,tp=2
  --inspect blocks.0.mlp.up [--phase backward] [--rank 5]
"""

from __future__ import annotations

import logging

import torch
from rich.console import Console
from torch.distributed.tensor import Partial, Replicate, Shard

import shardlang as sl
from lowering.debug import (Inspection, blocks, describe_value, inspect, print_inspection,
                            rank_prefix, sharding_of, show_sharding)
from lowering.run import Layout
from lowering.run.registry import resolve
from lowering.parallel.tensor import next_token_loss
from models.datasets import ArithmeticSequences

# DTensor warns when it reduces a Partial over two mesh axes one after the other; harmless here
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

MODEL = resolve("gpt-tiny")
MESH = sl.Mesh(dp=2, sp=2, tp=2)
LAYOUT = Layout(MODEL, MESH, sl.Rules.default())
RANK = 5                                # the rank we check by hand in (c)
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def identical_groups(values: dict[int, torch.Tensor]) -> list[list[int]]:
    """Ranks whose local tensors are bit-for-bit equal, grouped (singletons included)."""
    groups: list[list[int]] = []
    for r, v in sorted(values.items()):
        for g in groups:
            w = values[g[0]]
            if w.shape == v.shape and torch.equal(w, v):
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


def fmt_groups(groups: list[list[int]]) -> str:
    return " ".join("{" + ",".join(map(str, g)) + "}" for g in groups)


def single_device(sites: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The unsharded model on the same weights (seed 0) and the same batch (step 0):
    each site's full output, and the gradient of the loss arriving at it."""
    model = MODEL.build(seed=LAYOUT.seed)
    batch, seq = LAYOUT.shapes(model)
    idx, tgt = ArithmeticSequences(MODEL.vocab_size(model), seed=LAYOUT.seed).batch(0, batch, seq)
    outs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            outs[name] = out.detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook
    for name in sites:
        model.get_submodule(name).register_forward_hook(keep(name))
    next_token_loss(model(idx), tgt).backward()
    return outs, grads


# -- (a) ------------------------------------------------------------------------------------
def section_a() -> None:
    header(f"(a) Who holds which block: gpt-tiny on {MESH!r}, {MESH.size} ranks")
    print("Rank r's coordinate on each axis (canonical order dp, sp, tp; tp varies fastest):")
    print("  " + "  ".join(rank_prefix(MESH, r) for r in range(4)))
    print("  " + "  ".join(rank_prefix(MESH, r) for r in range(4, 8)))
    print("Placements list one entry per mesh axis in that order: dp:R sp:R tp:S(0) means")
    print("replicated over dp and sp, split along dim 0 over tp.\n")

    ok = True
    for name, dim, kind in (("blocks.0.attn.q.weight", 0, "column-parallel"),
                            ("blocks.0.mlp.down.weight", 1, "row-parallel")):
        shape, pl, spec, where, holders = sharding_of(LAYOUT, name)
        show_sharding(name, shape, pl, MESH, console, spec=spec, stage=where, ranks=holders)
        bl = blocks(shape, pl, MESH)
        half = shape[dim] // MESH.tp
        by_tp = {t: sorted(r for r in bl if MESH.coordinate(r)["tp"] == t) for t in range(2)}
        for t, ranks in by_tp.items():
            want = (t * half, (t + 1) * half)
            ok &= all(bl[r].ranges[dim] == want for r in ranks)
        print(f"{kind}: nn.Linear stores (out, in), so {name} {tuple(shape)} is split")
        print(f"along dim {dim} ({'out' if dim == 0 else 'in'} features): tp=0 ranks {by_tp[0]} "
              f"hold {0}:{half}, tp=1 ranks {by_tp[1]} hold {half}:{2 * half};")
        print(f"each block is held {len(by_tp[0])} times (copies over dp x sp).\n")

    shape, pl, spec, where, holders = sharding_of(LAYOUT, "blocks.0.attn")
    show_sharding("blocks.0.attn", shape, pl, MESH, console, spec=spec, stage=where,
                  ranks=holders)
    bl = blocks(shape, pl, MESH)
    same = [[r for r in bl if bl[r] == b] for b in dict.fromkeys(bl.values())]
    partial_over = sorted({a for b in bl.values() for a in b.partial})
    block_shape = tuple(hi - lo for lo, hi in bl[0].ranges)
    print(f"the output of blocks.0.attn {tuple(shape)}: batch split over dp (dim 0), sequence "
          f"over sp (dim 1),")
    print(f"and partial over {'+'.join(partial_over)}: o is row-parallel, each tp rank "
          "multiplies its half of the heads, so each")
    print(f"holds a partial sum of its {block_shape} block; tp peers share the same ranges: "
          f"{fmt_groups(same)}.")
    print("The all-reduce over tp that makes it whole runs where the block adds attn's output")
    print("to the residual stream (Megatron's g), so blocks.0, not blocks.0.attn, issues it.")
    print("(show_sharding draws a grid for 1-D and 2-D tensors without partial sums; other")
    print("tensors get this table of distinct blocks.)")
    ok &= isinstance(pl[2], Partial) and partial_over == ["tp"] and len(same) == 4
    ok &= all(len(g) == 2 and MESH.coordinate(g[0])["tp"] != MESH.coordinate(g[1])["tp"]
              for g in same)
    if not ok:
        raise SystemExit("the blocks are not where the lesson says")


# -- (b) ------------------------------------------------------------------------------------
def section_b() -> Inspection:
    header("(b) inspect: every rank's local value of blocks.0.mlp.up's output")
    ins = inspect(LAYOUT, "blocks.0.mlp.up")
    print_inspection(ins, console)
    bl = blocks(ins.shape, ins.placements, MESH)
    print(f"global shape {ins.shape}, placements {tuple(map(str, ins.placements))}: "
          "dp splits the batch, sp the sequence, tp the hidden units (mlp.up is column-parallel).")
    shapes_ok = all(tuple(v.shape) == tuple(hi - lo for lo, hi in bl[r].ranges)
                    for r, v in ins.values.items())
    print(f"every rank's local shape is its block's shape: {'yes' if shapes_ok else 'NO'}")
    groups = identical_groups(ins.values)
    print(f"ranks with identical local tensors: {fmt_groups(groups)}")
    replicated = [a for a, p in zip(MESH.shape, ins.placements) if isinstance(p, Replicate)]
    print(f"{len(groups)} distinct tensors on {len(ins.values)} ranks: replicated over "
          f"{replicated or 'no axis'}, so no two ranks hold the same values. A replica would")
    print("show up here as a group of ranks (see (d)); a rank that should be a replica but is")
    print("not is the first thing to look for when a sharded run drifts from one device.")
    if not shapes_ok or len(groups) != MESH.size or replicated:
        raise SystemExit("blocks.0.mlp.up should be split over every axis")
    return ins


# -- (c) ------------------------------------------------------------------------------------
def section_c(ins: Inspection) -> dict[str, torch.Tensor]:
    header(f"(c) Check rank {RANK} by hand against the single-device model")
    full, grads = single_device(["blocks.0.mlp.up", "blocks.0.attn"])
    print(f"one device, seed {LAYOUT.seed}, step-0 batch of ArithmeticSequences: blocks.0.mlp.up "
          f"output {tuple(full['blocks.0.mlp.up'].shape)}")
    b = blocks(ins.shape, ins.placements, MESH)[RANK]
    print(f"{rank_prefix(MESH, RANK)} holds block {b}")
    print("Read the ranges off the Block rather than assuming: sp's default split is contiguous")
    print("(sp=0 tokens 0:16, sp=1 tokens 16:32); with load_balance=True the sequence is")
    print("reordered first, and the ranges then index the reordered tokens.")
    sl_ = tuple(slice(lo, hi) for lo, hi in b.ranges)
    err = (full["blocks.0.mlp.up"][sl_] - ins.values[RANK]).abs().max().item()
    print(f"full[{', '.join(f'{lo}:{hi}' for lo, hi in b.ranges)}] vs ins.values[{RANK}]: "
          f"max abs error {err:.1e}")
    worst = max((full["blocks.0.mlp.up"][tuple(slice(lo, hi) for lo, hi in blk.ranges)]
                 - ins.values[r]).abs().max().item()
                for r, blk in blocks(ins.shape, ins.placements, MESH).items())
    print(f"the same for all {MESH.size} ranks: worst max abs error {worst:.1e}")
    if not (err < 1e-5 and worst < 1e-5):
        raise SystemExit(f"rank {RANK}'s block differs from the single-device activation")

    print("\nA Partial value is not a slice. blocks.0.attn's output is partial over tp (a):")
    att = inspect(LAYOUT, "blocks.0.attn")
    peers = [r for r in range(MESH.size) if all(
        MESH.coordinate(r)[a] == MESH.coordinate(RANK)[a] for a in ("dp", "sp"))]
    pb = blocks(att.shape, att.placements, MESH)[RANK]
    want = full["blocks.0.attn"][tuple(slice(lo, hi) for lo, hi in pb.ranges)]
    alone = (att.values[RANK] - want).abs().max().item()
    summed = (sum(att.values[r] for r in peers) - want).abs().max().item()
    print(f"{rank_prefix(MESH, RANK)} block {pb}; its tp group is ranks {peers}")
    print(f"  rank {RANK}'s value alone vs one device: max abs error {alone:.3g} (half the heads)")
    print(f"  sum over ranks {peers} vs one device:   max abs error {summed:.1e}")
    if not (summed < 1e-5 and alone > 1e-3):
        raise SystemExit("the partial sums do not add up to the single-device output")
    return grads


# -- (d) ------------------------------------------------------------------------------------
def section_d(grads: dict[str, torch.Tensor]) -> None:
    header("(d) The backward view: the gradient arriving at blocks.0.attn's output")
    ins = inspect(LAYOUT, "blocks.0.attn", phase="backward")
    print(f"global shape {ins.shape}, placements {tuple(map(str, ins.placements))}")
    for r, v in sorted(ins.values.items()):
        print(f"{rank_prefix(MESH, r)} blocks.0.attn backward: {describe_value(v)}")
    groups = identical_groups(ins.values)
    print(f"ranks with identical local gradients: {fmt_groups(groups)}")
    tp_pairs = all(len(g) == 2 and {MESH.coordinate(r)["tp"] for r in g} == {0, 1}
                   and len({(MESH.coordinate(r)["dp"], MESH.coordinate(r)["sp"]) for r in g}) == 1
                   for g in groups)
    print(f"the groups are exactly the tp pairs (same dp, same sp): {'yes' if tp_pairs else 'NO'}")
    print("Forward, the output was partial over tp; its gradient is replicated over tp: the")
    print("adjoint of a sum is a copy. Both tp ranks need the full dL/dy to backpropagate")
    print("through their half of the heads (their half of o.weight's input features).")
    bl = blocks(ins.shape, ins.placements, MESH)
    worst = max((grads["blocks.0.attn"][tuple(slice(lo, hi) for lo, hi in bl[r].ranges)]
                 - v).abs().max().item() for r, v in ins.values.items())
    print(f"every rank's block vs the single-device gradient (loss = mean over all "
          f"{ins.shape[0] * ins.shape[1]} tokens): worst max abs error {worst:.1e}")
    ok = (tp_pairs and len(groups) == MESH.size // MESH.tp and worst < 1e-6
          and isinstance(ins.placements[2], Replicate)
          and all(isinstance(p, Shard) for p in ins.placements[:2]))
    if not ok:
        raise SystemExit("the gradient at blocks.0.attn is not what the lesson says")


def main() -> None:
    section_a()
    ins = section_b()
    grads = section_c(ins)
    section_d(grads)


if __name__ == "__main__":
    main()
