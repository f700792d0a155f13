"""Tutorials 07 (rank-local debugging) and 09 (reading a schedule): they run, and what
they print agrees with values recomputed here independently."""

from __future__ import annotations

import re

import torch

from lowering.run.registry import resolve
from lowering.parallel.tensor import next_token_loss
from models.datasets import ArithmeticSequences
from tests.test_tutorials import run_tutorial

F32 = 4


def _coord(r: int) -> tuple[int, int, int]:
    """(dp, sp, tp) of rank r on Mesh(dp=2, sp=2, tp=2): tp varies fastest."""
    return r // 4, (r // 2) % 2, r % 2


def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-tiny on one device, seed 0, step-0 batch (8, 32): blocks.0.mlp.up's output
    and the loss gradient arriving at blocks.0.attn's output."""
    ref = resolve("gpt-tiny")
    model = ref.build(seed=0)
    idx, tgt = ArithmeticSequences(ref.vocab_size(model)).batch(0, 8, 32)
    got: dict[str, torch.Tensor] = {}
    model.blocks[0].mlp.up.register_forward_hook(
        lambda m, a, out: got.__setitem__("up", out.detach().clone()))

    def attn_hook(m: torch.nn.Module, a: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda g: got.__setitem__("grad", g.detach().clone()))
    model.blocks[0].attn.register_forward_hook(attn_hook)
    next_token_loss(model(idx), tgt).backward()
    return got["up"], got["grad"]


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, pattern
    return float(m.group(1))


def test_07_rank_local_debugging() -> None:
    out = run_tutorial("07_rank_local_debugging.py")
    up, grad = _reference()
    prefix = {r: "[r{} dp={} sp={} tp={}]".format(r, *_coord(r)) for r in range(8)}
    for p in prefix.values():
        assert p in out, p

    # (a) column-parallel: rows split over tp; row-parallel: columns; attn's output partial
    even, odd = "ranks 0, 2, 4, 6", "ranks 1, 3, 5, 7"
    assert re.search(rf"│ 0:32 +│ {even} +│\n.*\n│ 32:64 +│ {odd} +│", out)
    assert re.search(rf"┃ dim 0 \\ dim 1 ┃ 0:128 +┃ 128:256 +┃", out)
    assert re.search(rf"│ 0:64 +│ {even} +│ {odd} +│", out)
    assert "blocks.0.attn (8, 32, 64) -> placements dp:S(0) sp:S(1) tp:P(sum)" in out
    for lo, hi, (b0, b1), (s0, s1) in ((0, 1, (0, 4), (0, 16)), (2, 3, (0, 4), (16, 32)),
                                       (4, 5, (4, 8), (0, 16)), (6, 7, (4, 8), (16, 32))):
        assert re.search(rf"│ {lo}, {hi} +│ .* │ \[{b0}:{b1}, {s0}:{s1}, 0:64\] partial over tp",
                         out), (lo, hi)

    # (b) every rank's block of mlp.up: shape and norm against the single-device activation
    assert "global shape (8, 32, 256), placements ('S(0)', 'S(1)', 'S(2)')" in out
    assert "ranks with identical local tensors: {0} {1} {2} {3} {4} {5} {6} {7}" in out
    for r in range(8):
        dp, sp, tp = _coord(r)
        block = up[4 * dp:4 * dp + 4, 16 * sp:16 * sp + 16, 128 * tp:128 * tp + 128]
        m = re.search(re.escape(prefix[r]) + r" │ \(4, 16, 128\) │ float32 │ (\S+) +│ (\S+) +│ "
                      r"(\S+) +│ (\S+) +│", out)
        assert m, r
        mn, mx, _, norm = map(float, m.groups())
        assert abs(mn - block.min().item()) < 1e-4 and abs(mx - block.max().item()) < 1e-4
        assert abs(norm - block.norm().item()) < 1e-4 * block.norm().item(), r

    # (c) rank 5 = dp 1, sp 0, tp 1: its block and the errors the script measured
    assert "[r5 dp=1 sp=0 tp=1] holds block [4:8, 0:16, 128:256]" in out
    assert _num(r"full\[4:8, 0:16, 128:256\] vs ins\.values\[5\]: max abs error (\S+)", out) < 1e-5
    assert _num(r"the same for all 8 ranks: worst max abs error (\S+)", out) < 1e-5
    assert "its tp group is ranks [4, 5]" in out
    assert _num(r"rank 5's value alone vs one device: max abs error (\S+)", out) > 1e-3
    assert _num(r"sum over ranks \[4, 5\] vs one device: +max abs error (\S+)", out) < 1e-5

    # (d) the gradient at blocks.0.attn: replicated over tp, equal to one device's
    assert "global shape (8, 32, 64), placements ('S(0)', 'S(1)', 'R')" in out
    assert "ranks with identical local gradients: {0,1} {2,3} {4,5} {6,7}" in out
    for r in range(8):
        dp, sp, _ = _coord(r)
        g = grad[4 * dp:4 * dp + 4, 16 * sp:16 * sp + 16]
        norm = _num(re.escape(prefix[r]) + r" blocks\.0\.attn backward: local \(4, 16, 64\) "
                    r"float32 .* norm (\S+)", out)
        assert abs(norm - g.norm().item()) < 1e-4 * g.norm().item(), r
    assert _num(r"single-device gradient .*: worst max abs error (\S+)", out) < 1e-6


def _gpt_tiny_local_bytes(tp: int) -> dict[str, int]:
    """Each parameter's bytes on one rank: wte, q/k/v/o, up and down split over tp."""
    model = resolve("gpt-tiny").build(meta=True)
    split = re.compile(r"wte\.weight|blocks\.\d+\.(attn\.[qkvo]|mlp\.(up|down))\.weight")
    return {n: p.numel() * F32 // (tp if split.fullmatch(n) else 1)
            for n, p in model.named_parameters()}  # the tied lm_head is listed once


def test_09_reading_a_schedule() -> None:
    out = run_tutorial("09_reading_a_schedule.py")
    local = _gpt_tiny_local_bytes(tp=2)
    assert len(local) == 44

    # (a) where the 22 collectives of rank 0 come from
    assert "prints rank 0's 22 collectives" in out
    for line in ("forward   1 x all_reduce over tp: vocab-parallel embedding",
                 "forward   8 x all_reduce over tp: row-parallel outputs attn.o, mlp.down (g)",
                 "forward   3 x all_reduce over tp: vocab-parallel loss",
                 "backward  1 x all_reduce over tp: vocab-parallel head",
                 "backward  8 x all_reduce over tp: block inputs of attn and mlp (f)",
                 "backward  1 x all_reduce over dp: a bucket of parameters' gradients"):
        assert line in out, line
    # every gradient in one bucket: its payload is the 44 local blocks, flattened
    assert f"flattened local blocks: {sum(local.values()) // F32:,} values = the 44 " in out
    assert "every dp payload = its parameters' local bytes: yes" in out
    assert "rank 3's tp group is [2, 3], its dp group [1, 3]" in out

    # (b) dp: 2(n-1)/n = 1 times every local parameter; tp: b=4, s=32, embed=64
    dp = sum(local.values())
    b, s, e = 8 // 2, 32, 64
    tp = 2 * 8 * b * s * e * F32 + 2 * b * s * e * F32 + 3 * b * s * F32
    assert (dp, tp) == (438_784, 591_360)
    assert f"dp: recorded {dp:,} B, by hand {dp:,} B: equal" in out
    assert f"tp: recorded {tp:,} B, by hand {tp:,} B: equal" in out
    assert f"dp: 1 collectives, recorded {dp:,} B, ex.analytic['dp'].wire_bytes {dp:,} B" in out
    assert f"tp: 21 collectives, recorded {tp:,} B, ex.analytic['tp'].wire_bytes {tp:,} B" in out

    # (c) pp=2, dp=2, tp=2, m=2: batch 16, b = 16/2/2 = 4 rows per microbatch
    m, block = 2, 4 * 32 * 64 * F32
    layer = sum(v for n, v in local.items() if n.startswith("blocks.0."))
    shared = local["wte.weight"] + local["wpe.weight"] + local["ln_f.weight"] + local["ln_f.bias"]
    want = {
        0: {"tp": (18, m * (1 + 8) * block), "pp": (8, m * block + shared),
            "dp": (22, 2 * layer + local["wte.weight"] + local["wpe.weight"])},
        4: {"tp": (26, m * (1 + 8 + 1) * block + m * 3 * 4 * 32 * F32),
            "pp": (8, m * block + shared),
            "dp": (23, 2 * layer + local["wte.weight"] + 2 * 64 * F32)},
    }
    for r, axes in want.items():
        section = out.split(f"\nrank {r}:\n", 1)[1]
        for axis, (count, wire) in axes.items():
            assert re.search(rf"^  {axis}: +{count} collectives, recorded +{wire:,} B, analytic "
                             rf"+{wire:,} B, by hand +{wire:,} B$", section, re.M), (r, axis)
    assert "rank 0: F0 F1 B0 B1; rank 4: F0 B0 F1 B1." in out
    assert out.count("pipeline 0->1 (activation, microbatch") == 4  # 2 sends, 2 receives

    # (d) --json: totals and analytic agree, the jq-like extractions
    assert "(exit 0)" in out
    assert f"{{'tp': {tp:.1f}, 'dp': {dp:.1f}}}" in out
    assert "['(model)', 'blocks.3', 'blocks.3', 'blocks.2', 'blocks.2', 'blocks.1', 'blocks.1', " \
           "'blocks.0', 'blocks.0']" in out
    assert f"over the tp terms: {tp:,} B = analytic tp {tp:,} B" in out
