"""Lesson 06 runs end to end on CPU: one model, one rules table, a mesh grown from 3D to 5D."""

from __future__ import annotations

import math
import re

from tests.test_tutorials import run_tutorial

# gpt-moe-tiny under pp=2 with 2 microbatches: batch 8 per microbatch, seq 32, width 64,
# 4 heads of 16, 4 experts top-2 with capacity factor 2.0; everything below is derived
# from these, independently of the lesson's code
MB, SEQ, WIDTH, HEADS, HEAD_DIM, EXPERTS, TOP_K, CF = 8, 32, 64, 4, 16, 4, 2, 2.0
MESHES = {  # name -> (repr, sizes)
    "3D": ("Mesh(pp=2, dp=2, tp=2)", dict(pp=2, dp=2, ep=1, sp=1, tp=2)),
    "4D": ("Mesh(pp=2, dp=2, sp=2, tp=2)", dict(pp=2, dp=2, ep=1, sp=2, tp=2)),
    "5D": ("Mesh(pp=2, dp=2, ep=2, sp=2, tp=2)", dict(pp=2, dp=2, ep=2, sp=2, tp=2)),
}
ORDER = ("pp", "dp", "ep", "sp", "tp")


def _local(sizes: dict[str, int]) -> tuple[int, int]:
    """(rows, tokens per row) of one microbatch on one rank: batch over (dp, ep), seq over sp."""
    return MB // (sizes["dp"] * sizes["ep"]), SEQ // sizes["sp"]


def _section(out: str, letter: str) -> str:
    start = out.index(f"\n({letter}) ")
    nxt = re.search(r"\n\([a-e]\) |\nWhat to remember", out[start + 1:])
    return out[start:start + 1 + nxt.start()] if nxt else out[start:]


def test_06_hybrid_5d() -> None:
    out = run_tutorial("06_hybrid_5d.py")
    assert "DIFFERENT" not in out and "MISMATCH" not in out and "NOT" not in out

    # (a), (b): per axis, recorded = analytic for rank 0 and the last stage's first rank
    for name, last, axes in (("3D", 4, "pp, dp, tp"), ("4D", 8, "pp, dp, sp, tp")):
        for r in (0, last):
            assert f"-> rank {r}: recorded = analytic on every axis ({axes}): yes" in out
        assert f"simulate recorded the same schedules as explain for ranks 0 and {last}: yes" in out
    assert out.count("-> exact") == 3 + 3 + 4 + 4
    a = _section(out, "a")
    for axis, count, wire in (("pp", 8, 107_008), ("dp", 27, 699_496), ("tp", 18, 983_040)):
        assert re.search(rf"  {axis}: +{count} collectives, +{wire:,} B on the wire .*; analytic "
                         rf"{count}, {wire:,} B -> exact", a), axis

    # pp wire bytes, computed here: 2 sends of this rank's block of one microbatch's hidden
    # state (a recv sends nothing), and the all-reduce (wire = payload for n = 2) of the
    # weights both stages hold: wte (vocab 256 split over tp), wpe, ln_f weight and bias
    shared = (256 // 2) * WIDTH * 4 + SEQ * WIDTH * 4 + 2 * WIDTH * 4
    for name, (mesh, sizes) in MESHES.items():
        b, t = _local(sizes)
        block = b * t * WIDTH * 4
        sec = _section(out, {"3D": "a", "4D": "b", "5D": "c"}[name])
        pp = re.findall(r"  pp: +8 collectives, +([\d,]+) B on the wire \(4 all_reduce \+ 2 recv "
                        r"\+ 2 send\)", sec)
        assert pp == [f"{2 * block + shared:,}"] * 2, (name, pp)
        # the dense blocks' tp all-reduces and the pipeline sends carry b*s*h*4 bytes
        assert (f"  {name}: b*s*h*4 = {b}*{t}*{WIDTH}*4 = {block:,} B; block all-reduces over tp "
                f"[{block}] B, pipeline send [{block}] B: equal") in out

    # (b) ring attention: 2 layers * 2 microbatches * (sp-1) permutes each way on sp
    b, t = _local(MESHES["4D"][1])
    kv = 2 * b * (HEADS // 2) * t * HEAD_DIM * 4
    perms = re.findall(r"(forward|backward) +permute +blocks\.[01]\.attn +\[[\d, ]+\] +([\d,]+) B",
                       _section(out, "b"))
    assert len(perms) == 8 and {p for _, p in perms} == {f"{kv:,}"}
    assert sorted(ph for ph, _ in perms) == ["backward"] * 4 + ["forward"] * 4
    assert re.search(r"  sp: +35 collectives, .*\(27 all_reduce \+ 8 permute\); analytic 35", out)

    # (c) MoE all-to-alls on ep: 4 per microbatch per MoE layer, buffer X * C * h * 4
    b, t = _local(MESHES["5D"][1])
    cap = math.ceil(CF * TOP_K * b * t / EXPERTS)
    buf = EXPERTS * cap * WIDTH * 4
    c = _section(out, "c")
    for layer in (1, 3):
        a2a = re.findall(rf"(forward|backward) +all_to_all +blocks\.{layer}\.mlp +\[[\d, ]+\] +"
                         rf"([\d,]+) B", c)
        assert len(a2a) == 8 and {x for _, x in a2a} == {f"{buf:,}"}, (layer, a2a)
    assert out.count(f"= {buf:,} B (T = {b}*{t} = {b * t} tokens, C = ceil({CF}*{TOP_K}*{b * t}/"
                     f"{EXPERTS}) = {cap}): equal") == 2
    assert re.search(r"  ep: +31 collectives, .*\(23 all_reduce \+ 8 all_to_all\)", c)

    # every layout: the same loss on every rank, and it matches one device
    for name, (mesh, sizes) in MESHES.items():
        world = math.prod(sizes.values())
        assert re.search(rf"simulate\({re.escape(mesh)}, steps=1\): loss [\d.]+ on every one of "
                         rf"the {world} ranks", out), name
        m = re.search(rf"{re.escape(mesh)} vs one device: matched \(worst gradient error (\S+) ",
                      out)
        assert m and float(m.group(1)) < 1e-5, name

    # (d) the table: world size, rank 0's counts per axis (a new axis adds, the rest stay),
    # the worst gradient error, matched; and the set of axes grows pp,dp,tp -> +sp -> +ep
    rows = {}
    for line in _section(out, "d").splitlines():
        cells = [x.strip() for x in re.split(r"[│|┃]", line)[1:-1]]
        if cells and cells[0] in MESHES:
            rows[cells[0]] = cells
    expect = {"3D": ["8", "27", "-", "-", "18"], "4D": ["8", "27", "-", "35", "18"],
              "5D": ["8", "27", "31", "35", "18"]}
    for name, (mesh, sizes) in MESHES.items():
        row = rows[name]
        assert row[2] == str(math.prod(sizes.values())), row
        assert row[3:8] == expect[name], row
        assert float(row[9]) < 1e-5 and row[10] == "matched", row
    assert ("mesh axes in rank 0's schedule: 3D: {pp, dp, tp} -> 4D: {pp, dp, sp, tp} -> "
            "5D: {pp, dp, ep, sp, tp}") in out

    # (e) canonical order pp, dp, ep, sp, tp, row-major with tp fastest
    for r in (0, 1, 2, 4, 8, 16, 21, 31):
        coord = {a: (r >> (4 - i)) & 1 for i, a in enumerate(ORDER)}
        assert f"rank {r:2}: {coord}" in out, r
    assert "rank_of(coordinate(r)) == r for all 32 ranks: yes" in out
    for i, axis in enumerate(reversed(ORDER)):
        assert f"  {axis}: [0, {2 ** i}] (stride {2 ** i})" in out
