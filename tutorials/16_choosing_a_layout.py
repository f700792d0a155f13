"""Lesson 16: choosing a layout: which mesh, and will it fit, before anything launches.

A LLaMA-7B sized decoder (the ``gpt-7b`` preset), 32 H100s, a global batch of 64 rows of
2048 tokens, bf16. Every number below comes from a dry trace or a formula on this CPU;
nothing runs on a GPU. You will see:

  (a) why one GPU cannot hold it: 16 bytes per parameter before any activation
      (fp32 master weights, fp32 gradients, AdamW's two moments);
  (b) the search space: every factorization of 32 over pp, dp, ep, sp, tp, with FSDP on
      or off, microbatches and schedules, and why some are ruled out by shapes;
  (c) a formula estimate of each candidate's memory and step time, and what dominates
      the step of a few hand-picked layouts;
  (d) the search itself (``shardlang plan``): the best by estimate traced in dry mode,
      each with its exact schedule, memory and predicted time, ranked as
      ``explain --device`` ranks them, and why the winner wins;
  (e) the hardware changes the answer: the same model on nodes of 2 GPUs.

Run it:  python tutorials/16_choosing_a_layout.py
"""

from __future__ import annotations

from lowering.plan import device, human
from lowering.plan.search import candidates, estimate
from lowering.run import Layout, explain
from lowering.search import profile, search

H100 = device("h100-80gb")
BASE = Layout.of("gpt-7b", "dp=1", batch=64, seq=2048, precision="bf16")
WORLD = 32


def section(title: str) -> None:
    print(f"\n=== {title} ===")


section("(a) one GPU")
prof = profile(BASE)  # one row traced on one device (meta tensors): compute, activations
state = 16 * prof.params
print(f"{prof.params:,} parameters x 16 bytes (fp32 weight, fp32 gradient, AdamW's two "
      f"fp32 moments) = {human(state)}; an H100 has {human(H100.memory)}")
print(f"activations saved for backward: {human(prof.activations)} per row of "
      f"{prof.seq} tokens, {human(prof.activations * prof.batch)} for the batch of "
      f"{prof.batch}")
print(f"one GPU fits: {state + prof.activations <= H100.memory}")

section("(b) the search space")
cands, dropped = candidates(WORLD, prof, gpus_per_node=H100.gpus_per_node)
print(f"{len(cands)} layouts of {WORLD} GPUs pass the shape checks; ruled out:")
for why, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
    print(f"  {n:4d} x {why}")

section("(c) estimates for a few layouts")
picks = {"dp=32 (fsdp)": None, "dp=4,tp=8": None, "pp=4,dp=1,tp=8 (1f1b m=16)": None,
         "pp=2,dp=2,tp=8 (1f1b m=8)": None}
for c in cands:
    if c.label().replace(",dp=1", "") in {k.replace(",dp=1", "") for k in picks}:
        pred, peak = estimate(c, prof, H100, precision="bf16")
        fits = "fits" if peak <= H100.memory else "DOES NOT FIT"
        print(f"  {c.label():36s} step {pred.step_s:6.3f} s, {pred.mfu:5.1%} MFU, "
              f"peak {human(peak):>9s} {fits}; {pred.why}")

section("(d) the search: the best by estimate, traced")
found = search(BASE, WORLD, H100, top=3, budget_s=0)
for i, f in enumerate(found.found, 1):
    p = f.predicted
    print(f"  #{i} {f.candidate.label():36s} {p.step_s:.3f} s/step, {p.tokens_per_s:,.0f} "
          f"tokens/s, {p.tflops_per_gpu:.0f} TFLOP/s per GPU ({p.mfu:.1%} MFU), peak "
          f"{human(f.memory.peak)}; {p.why}")
best = found.found[0]
ex = explain(Layout.of("gpt-7b", best.candidate.mesh, best.candidate.rules, batch=64, seq=2048,
                       precision="bf16",
                       **best.candidate.options()))
again = ex.predict(H100)
print(f"explain --device h100-80gb on the winner predicts {again.step_s:.3f} s: the same "
      f"number (plan ranks by explain's prediction)")
print("why the winner wins: " + ", ".join(
    f"{axis} {again.exposed_s.get(axis, 0.0) / again.step_s:.0%} of the step exposed "
    f"({'NVLink' if axis in ('tp',) else 'overlapped or NVLink'})" for axis in again.axis_s)
    + f"; compute {again.compute_s / again.step_s:.0%}")

section("(e) nodes of 2 GPUs")
found2 = search(BASE, WORLD, H100, top=1, gpus_per_node=2, budget_s=0)
f2 = found2.found[0]
print(f"best with 2 GPUs per node: {f2.candidate.label()} at {f2.predicted.step_s:.3f} s "
      f"({f2.predicted.why}); tp now spans at most {2} GPUs, so the search leans on "
      f"other axes (with 8 per node: {best.candidate.label()})")
