"""Lessons 11 (your own loop) and 12 (checkpoints that reshard) run, and what they print
agrees with what is recomputed here."""

from __future__ import annotations

import re

from tests.test_tutorials import run_tutorial


def _losses(line: str) -> list[float]:
    return [float(v) for v in line.split(":", 1)[1].split()]


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def test_11_your_own_training_loop() -> None:
    out = run_tutorial("11_your_own_training_loop.py")
    one = _losses(next(ln for ln in out.splitlines() if ln.startswith("(a) one device")))
    mesh = _losses(next(ln for ln in out.splitlines() if ln.startswith("(a) Mesh(dp=2, tp=2)")))
    assert len(one) == 6 and _close(mesh, one) and one[-1] < one[0] - 1.0  # it learns
    assert "equal to one device (1e-5): True" in out
    # dp=2: rank 2 holds the second half of the 4 rows
    assert re.search(r"rank 0 holds rows \(\d+, \d+\), rank 2 holds rows", out)
    # one bucket of gradients per step (all of them: 27,008 B of local blocks) despite 2
    # accumulation microbatches (no_sync), plus the loss's token count per microbatch
    grads = re.findall(r"backward  all_reduce     dp .* ([\d,]+) B  (.+)$", out, re.M)
    assert grads == [("27,008", "grads head.weight .. pos")]
    assert len(re.findall(r"forward   all_reduce     dp .* loss$", out, re.M)) == 2
    assert re.search(r"optimizer all_reduce     tp .* clip_grad_norm_$", out, re.M)
    # (d) a pipeline driven by par.step: one device's losses; the first stage sends both
    # microbatches' activations, then receives their gradients (1F1B), the last stage
    # alternates; both sum the embedding's and the head's gradients over pp
    d_one = _losses(next(ln for ln in out.splitlines() if ln.startswith("(d) one device")))
    d_pp = _losses(next(ln for ln in out.splitlines() if ln.startswith("(d) Mesh(pp=2, dp=2)")))
    assert len(d_one) == 6 and _close(d_pp, d_one) and d_one[-1] < d_one[0] - 1.0
    first = next(ln for ln in out.splitlines() if ln.strip().startswith("rank 0: send"))
    last = next(ln for ln in out.splitlines() if ln.strip().startswith("rank 2: recv"))
    assert "send activation, microbatch 1; recv gradient, microbatch 0" in first
    assert "recv activation, microbatch 0; send gradient, microbatch 0; recv activation" in last
    for line in (first, last):
        assert "summed over pp: emb.weight (held by every pipeline stage), head.weight" in line


def test_12_checkpoint_and_reshard() -> None:
    out = run_tutorial("12_checkpoint_and_reshard.py")
    lines = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if ":" in ln}
    a = _losses(lines["(a) tp=4, 6 steps"])
    assert _close(_losses(lines["(b) dp=2,tp=2 then tp=4"]), a)
    c = _losses(lines["(c) dp=2,tp=2, 6 steps"])
    assert _close(_losses(lines["FSDP dp=4 then dp=2,tp=2"]), c)
    assert "shardlang.pt" in out and ".metadata" in out
    assert "no checkpoint at" in out and "step-00009.partial, whose saves did not finish" in out
    assert "is of another model (other shapes: down.bias (32,) -> (48,)" in out
