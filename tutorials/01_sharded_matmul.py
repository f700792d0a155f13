"""Lesson 01: the four ways to shard a matrix multiply y = x @ w.

Every parallel layout of a neural network is built from one question asked of each
matmul: which dim of ``x`` (batch, k) @ ``w`` (k, n) is split over the devices? There
are only four answers, and each one fixes which collective the matmul needs:

  case 1  batch split (x rows)           no collective; y is split on batch
  case 2  n split (w columns)            no collective; y is split on n
                                         (all-gather it if you want all of y)
  case 3  k split (x columns and w rows) each rank holds a partial sum of y:
                                         all-reduce (psum) or reduce-scatter
  case 4  batch and n split, 2-D mesh    no collective; y is split on both

You will see, for each case, the spec of x and w (from logical axes and rules), the
collectives that were recorded while every rank ran inside this one process (simulate
mode), and a check of the result against the plain ``x @ w``. The last section runs
backward, where the collectives move: the replicated input of a column-parallel matmul
needs an all-reduce of its gradient (Megatron's "f"), a psum needs none ("g").

Only the rules change between cases; the function and its logical axes stay the same.

Run it:  python tutorials/01_sharded_matmul.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console

import shardlang as sl
from lowering.printer import print_schedule
from lowering.run.functions import FunctionTrace, trace_function

BATCH, K, N = 8, 16, 12
XW_AXES = (("batch", "k"), ("k", "n"))  # logical axes of x and of w, one per dim
Y_AXES = ("batch", "n")                 # logical axes of y
console = Console(width=110)            # wide enough for the schedule tables


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


def matmul_psum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sl.psum(x @ w, "tp")  # sum the partial products over the ranks of tp


def matmul_gather(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sl.all_gather(x @ w, "tp", dim=1)  # glue the column blocks of y together


def matmul_scatter(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sl.psum_scatter(x @ w, "tp", dim=1)  # sum, but keep only my block of columns


def local_block(y: torch.Tensor, spec: sl.P, mesh: sl.Mesh, rank: int) -> torch.Tensor:
    """The block of the global ``y`` that ``rank`` should hold under ``spec``."""
    coord = mesh.coordinate(rank)
    for dim in range(y.dim()):
        for axis in spec.axes_of(dim):
            y = y.chunk(mesh.axis_size(axis), dim=dim)[coord[axis]]
    return y


def collectives(t: FunctionTrace) -> str:
    return ", ".join(f"{r.phase.value} {r.op.value} over {r.axis}" for r in t.records) or "none"


def run_case(label: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             mesh: sl.Mesh, rules: sl.Rules, x: torch.Tensor, w: torch.Tensor, *,
             in_axes: tuple[tuple[str | None, ...], ...] = XW_AXES,
             out_axes: tuple[str | None, ...] = Y_AXES, backward: bool = False) -> FunctionTrace:
    """Trace ``fn`` as a shard_map on ``mesh``, print its specs and schedule, check it."""
    print(f"mesh {mesh!r}, {rules!r}")
    for name, t, axes in (("x", x, in_axes[0]), ("w", w, in_axes[1])):
        print(f"  {name} {tuple(t.shape)}: logical axes {axes} -> spec {rules.spec(axes)!r}")
    out_spec = rules.spec(out_axes)
    f = sl.shard_map(fn, in_axes=in_axes, out_axes=out_axes)
    t = trace_function(f, [x, w], mesh=mesh, rules=rules, backward=backward)
    if t.records:
        print_schedule(t.records, mesh, console=console, title=f"{label}: schedule of rank 0")
    print(f"  collectives: {collectives(t)}")
    print(f"  y {tuple(t.output.shape)}: spec {out_spec!r}, placements {t.placements}")

    y = x @ w
    err = (t.output - y).abs().max().item()
    if not torch.allclose(t.output, y, atol=1e-5):
        raise SystemExit(f"{label}: result does NOT match x @ w (max error {err:.1e})")
    for rank, block in enumerate(t.local):
        if not torch.allclose(block, local_block(y, out_spec, mesh, rank), atol=1e-5):
            raise SystemExit(f"{label}: rank {rank} holds the wrong block of y")
    print(f"  each of the {mesh.size} ranks holds its {tuple(t.local[0].shape)} block of y")
    print(f"{label}: result matches x @ w (max error {err:.1e})")
    return t


def main() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(BATCH, K), torch.randn(K, N)
    tp2 = sl.Mesh(tp=2)

    header("Case 1: split the batch (the rows of x); w is replicated")
    print("Each rank multiplies its own rows by the whole w: rows never mix in a matmul,")
    print("so no rank needs anything from another. This is data parallelism.")
    run_case("case 1", matmul, sl.Mesh(dp=2), sl.Rules(batch="dp"), x, w)

    header("Case 2: split n (the columns of w); x is replicated  [column-parallel]")
    print("Each rank computes the columns of y that its columns of w produce: again no")
    print("communication, but y ends up split on n.")
    run_case("case 2", matmul, tp2, sl.Rules(n="tp"), x, w)
    print("\nTo get all of y on every rank, all-gather the column blocks (dim=1):")
    t = run_case("case 2 + all_gather", matmul_gather, tp2, sl.Rules(n="tp"), x, w,
                 out_axes=("batch", None))
    r = t.records[0]
    print(f"  the all-gather produces {r.bytes} B (all of y, {BATCH}x{N} fp32) and sends "
          f"(n-1)/n of it: {r.wire_bytes:.0f} B")

    header("Case 3: split k, the contraction dim (x columns, w rows)  [row-parallel]")
    half = K // 2
    partial = [x[:, :half] @ w[:half], x[:, half:] @ w[half:]]
    print(f"Rank 0 holds x[:, :{half}] and w[:{half}]; rank 1 holds x[:, {half}:] and "
          f"w[{half}:]. Each rank's")
    print(f"x_r @ w_r is a full-size {tuple(partial[0].shape)} *partial sum*; y is their sum:")
    print(f"  |x[:, :{half}] @ w[:{half}] - x @ w| max = "
          f"{(partial[0] - x @ w).abs().max():.2f}  (not y)")
    print(f"  |partial 0 + partial 1 - x @ w| max = {(sum(partial) - x @ w).abs().max():.1e}")
    print("\nForgetting the sum is caught: the output still varies over tp, but out_axes")
    print("say y is not split over tp.")
    try:
        f = sl.shard_map(matmul, in_axes=XW_AXES, out_axes=Y_AXES)
        trace_function(f, [x, w], mesh=tp2, rules=sl.Rules(k="tp"))
        raise SystemExit("case 3 without psum should have raised ShardingError")
    except sl.ShardingError as e:
        print(f"  ShardingError: {e}")
    print("\nWith sl.psum the partial sums are all-reduced:")
    t2 = run_case("case 3", matmul_psum, tp2, sl.Rules(k="tp"), x, w)
    print("\nOr sl.psum_scatter sums and keeps y split on n (a reduce-scatter):")
    ts = run_case("case 3 + psum_scatter", matmul_scatter, tp2, sl.Rules(k="tp", n="tp"), x, w,
                  in_axes=(("batch", "k"), ("k", None)))
    ar, rs = t2.records[0].wire_bytes, ts.records[0].wire_bytes
    print(f"  wire bytes: all-reduce {ar:.0f} B, reduce-scatter {rs:.0f} B ({rs / ar:.0%})")
    print("\nThe same all-reduce on tp=4: the payload stays the same, the wire grows to "
          "2(n-1)/n of it:")
    t4 = run_case("case 3 on tp=4", matmul_psum, sl.Mesh(tp=4), sl.Rules(k="tp"), x, w)
    for t in (t2, t4):
        r = t.records[0]
        print(f"  tp={r.group_size}: payload {r.bytes} B, 2*({r.group_size}-1)/{r.group_size}"
              f"*{r.bytes} = {2 * (r.group_size - 1) * r.bytes / r.group_size:.0f} B, "
              f"recorded {r.wire_bytes:.0f} B")

    header("Case 4: split the batch over dp and n over tp, on a 2-D mesh")
    print("Cases 1 and 2 at once: still no collective, and each of the 4 ranks holds one")
    print("(batch block, column block) tile of y.")
    run_case("case 4", matmul, sl.Mesh(dp=2, tp=2), sl.Rules(batch="dp", n="tp"), x, w)

    header("Backward: where the collectives move")
    print("Column-parallel (case 2): x is replicated, but each rank only sees the gradient")
    print("flowing through its own columns of w, so dL/dx is a partial sum over tp.")
    t = run_case("case 2 backward", matmul, tp2, sl.Rules(n="tp"), x, w, backward=True)
    bwd = [r for r in t.records if r.phase.value == "backward"]
    same = "=" if bwd[0].shape == x.shape else "!="
    print(f"  backward all-reduces over tp: {sum(r.op.value == 'all_reduce' for r in bwd)}, "
          f"of shape {list(bwd[0].shape)} {same} the shape of x {list(x.shape)}")
    print("  This is Megatron's 'f': identity in forward, all-reduce in backward.")
    t = run_case("case 3 backward", matmul_psum, tp2, sl.Rules(k="tp"), x, w, backward=True)
    phases = [r.phase.value for r in t.records]
    print(f"  psum: {phases.count('forward')} forward and {phases.count('backward')} backward "
          "collectives. Megatron's 'g': all-reduce in forward, identity in backward.")
    t = run_case("case 1 backward", matmul, sl.Mesh(dp=2), sl.Rules(batch="dp"), x, w,
                 backward=True)
    r = t.records[0]
    print(f"  data parallel: w's gradient {list(r.shape)} needs a {r.op.value} over {r.axis} "
          "in backward: the DDP gradient all-reduce.")


if __name__ == "__main__":
    main()
