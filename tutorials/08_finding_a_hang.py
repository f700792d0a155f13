"""Lesson 08: finding a hang.

A collective is a meeting: every rank of the group must call the same one, in the same
order, with the same shape. The ranks do not compare notes; they just pair their n-th
call on a group with each other's n-th call. A rank-dependent branch ("only rank 0 logs
a diagnostic") or a rank-dependent shape (an uneven last batch) breaks that, and a
real job then waits forever in the first collective the ranks disagree on, with no
error and no hint of where. ``models/debugging.py`` holds two such bugs on purpose:
``rank_branch`` (tp rank 0 issues one extra ``sl.psum``) and ``uneven`` (each tp rank
psums a slice whose length depends on its rank). You will see:

  (a) on one device both models are fine: the bug is invisible until you shard;
  (b) predicted before launch: ``explain --all-ranks`` traces every rank separately
      (dry mode, meta tensors) and compares their schedules; the Python API
      ``explain`` + ``divergences`` gives the same answer, and the two ranks' schedules
      side by side show where they part;
  (c) caught at run time: ``run`` refuses to launch a predicted hang; with
      ``--launch-anyway`` each rank's collective check stops the job with an error
      naming both ranks and both collectives, in seconds, instead of hanging;
  (d) the same for a shape mismatch (``uneven``): [8, 32, 32] against [8, 31, 32];
  (e) the knobs (--check-collectives, SHARDLANG_CHECK_TIMEOUT, SHARDLANG_TIMEOUT,
      --timeout), the check's mechanism on a real key-value store, its cost per
      collective, and what the same job does with the check off.

Run it:  python tutorials/08_finding_a_hang.py        (about 50 s: three small torchrun jobs)
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import shardlang as sl
import lowering.run.guard as guard
from lowering.debug import divergences
from lowering.run.guard import CollectiveGuard, CollectiveMismatch
from lowering.run import Layout, explain
from lowering.run.registry import resolve
from models.debugging import RankBranch, rank_branch, uneven

ROOT = Path(__file__).resolve().parents[1]
MESH = "tp=2"
CHECK_TIMEOUT = 10          # SHARDLANG_CHECK_TIMEOUT for the launches in (c) and (d)
LAUNCH_TIMEOUT = 120        # run's --timeout for those launches
console = Console(width=120)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def shardlang(*args: str, env: dict[str, str] | None = None,
              timeout: float = 180) -> tuple[int, str, float]:
    """``python -m lowering ARGS`` from the repository root: (exit code, stdout+stderr,
    seconds). The outer timeout is a safety net; the lesson's own limits are the flags."""
    full = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowering", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def unwrap(text: str, start: str, end: str) -> str:
    """The CLI prints through rich at 160 columns; undo its line wrapping for one message."""
    i = text.index(start)
    j = text.index(end, i) + len(end)
    return " ".join(part.strip() for part in text[i:j].splitlines())


def command(*args: str, env: str = "") -> str:
    return f"$ {env + ' ' if env else ''}python -m lowering {' '.join(args)}"


def side_by_side(ranks: dict[int, list], first: int, title: str) -> None:
    """Both ranks' tp schedules, index by index, with the first disagreement marked."""
    t = Table(title=title, title_justify="left")
    t.add_column("#", justify="right")
    for r in (0, 1):
        t.add_column(f"rank {r}: phase")
        t.add_column("op")
        t.add_column("shape")
    t.add_column("")
    a, b = ranks[0], ranks[1]
    for i in range(max(len(a), len(b))):
        cells: list[str] = []
        for recs in (a, b):
            rec = recs[i] if i < len(recs) else None
            cells += (["-", "(none)", "-"] if rec is None else
                      [rec.phase.value, rec.op.value, str(list(rec.shape))])
        same = (i < len(a) and i < len(b) and a[i].signature() == b[i].signature())
        mark = "same" if same else ("<- first disagreement" if i == first else "differs")
        t.add_row(str(i), *cells, mark)
    console.print(t)


def predict(factory: str) -> tuple[object, list]:
    """The Python API behind ``explain --all-ranks``: dry-trace both ranks, compare."""
    layout = Layout(resolve(factory), sl.Mesh.parse(MESH))
    ex = explain(layout, ranks=[0, 1])
    return ex, divergences(ex.schedules.ranks, layout.mesh)


def launch_anyway(factory: str) -> tuple[int, list[str], float]:
    """A real 2-process gloo run of a predicted hang; returns the lines that matter."""
    args = ("run", factory, "--mesh", MESH, "--steps", "1", "--launch-anyway",
            "--timeout", str(LAUNCH_TIMEOUT))
    env = {"SHARDLANG_CHECK_TIMEOUT": str(CHECK_TIMEOUT)}
    print(command(*args, env=f"SHARDLANG_CHECK_TIMEOUT={CHECK_TIMEOUT}"))
    rc, out, secs = shardlang(*args, env=env, timeout=LAUNCH_TIMEOUT + 60)
    # shardlang prints each worker's error once and hides torchrun's own traceback
    keep = [line for line in out.splitlines()
            if line.startswith(("error:", "launching torchrun"))]
    if "Traceback" in out:
        raise SystemExit(f"a traceback reached the user:\n{out}")
    print(f"exit code {rc} after {secs:.1f} s; what it prints (no torchrun traceback):")
    for line in keep:
        print(f"  {line}")
    return rc, keep, secs


# -- (a) ------------------------------------------------------------------------------------------
def section_a() -> None:
    header("(a) One device: both models are fine")
    print("The bug, in RankBranch._probe (a shard_map body, so it sees one rank's block):")
    for line in inspect.getsource(RankBranch._probe).splitlines()[2:]:
        print(f"  | {line[4:]}")
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (8, 32))
    for name, factory in (("rank_branch", rank_branch), ("uneven", uneven)):
        model = factory()
        logits = model(idx)
        # the same model without its probe: the probe only adds 0 * (a psum)
        x = model.wte(idx)
        plain = model.head(x + model.down(torch.relu(model.up(x))))
        err = float((logits - plain).abs().max().detach())
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
        loss.backward()
        grads = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                    for p in model.parameters())
        print(f"{name}: token ids {tuple(idx.shape)} -> logits {tuple(logits.shape)}; "
              f"equals the model without its probe (max error {err:.1e}); "
              f"loss {loss.item():.4f}, every gradient finite: {grads}")
        if tuple(logits.shape) != (8, 32, 64) or err != 0.0 or not grads:
            raise SystemExit(f"{name} is not a correct single-device model")
    print("On one device axis_index('tp') is 0 and psum over a group of one is the identity:")
    print("the branch runs, harmlessly. With tp=2, rank 0 psums and rank 1 does not.")


# -- (b) ------------------------------------------------------------------------------------------
def section_b() -> None:
    header(f"(b) Predicted before launch: explain --all-ranks on Mesh({MESH})")
    args = ("explain", "models.debugging:rank_branch", "--mesh", MESH, "--all-ranks")
    print(command(*args))
    rc, out, secs = shardlang(*args)
    if rc != 4:
        raise SystemExit(f"explain did not exit 4 for a predicted hang ({rc}):\n{out}")
    tail = ("collective check: " + out.split("collective check: ")[-1]).strip()
    cli = unwrap(tail, "ranks 0 and 1", "hang here.")
    print(f"(its last lines, after each rank's schedule table; {secs:.1f} s, no process group)")
    print(f"  {tail.splitlines()[0]}")
    print(f"  {cli}")
    print(f"explain exits {rc} when it predicts a hang (0 when the ranks agree), so a script or "
          "CI job can gate a layout on it.")

    print("\nThe Python API underneath:")
    print("  ex = explain(Layout(resolve('models.debugging:rank_branch'), sl.Mesh(tp=2)), "
          "ranks=[0, 1])")
    print("  found = divergences(ex.schedules.ranks, layout.mesh)")
    ex, found = predict("models.debugging:rank_branch")
    print(f"  len(found) = {len(found)}; str(found[0]) =")
    d = found[0]
    print(f"  {d}")
    side_by_side(ex.schedules.ranks, d.index,
                 "rank_branch on tp=2: both ranks' collectives on tp, in issue order")
    ra, rb = d.records
    ok = (len(found) == 1 and d.ranks == (0, 1) and d.axis == "tp" and d.index == 1
          and ra is not None and rb is not None
          and (ra.phase.value, ra.shape) == ("forward", ())
          and (rb.phase.value, rb.shape) == ("backward", (8, 32, 32))
          and str(d) == cli and "collective check: 1 group(s) would hang" in tail)
    print(f"the CLI and the API name the same divergence: {'yes' if str(d) == cli else 'NO'}")
    if not ok:
        raise SystemExit("explain --all-ranks did not predict rank_branch's hang as expected")
    n0, n1 = len(ex.schedules.ranks[0]), len(ex.schedules.ranks[1])
    print("#0 (the row-parallel down projection's all-reduce) agrees. At #1 rank 0 issues its")
    print("extra psum of a scalar while rank 1 has already moved on to the backward pass: the")
    print("group would pair rank 0's 4-byte all-reduce with rank 1's 32 KiB one. Rank 0 issues")
    print(f"{n0} collectives per step, rank 1 {n1} (the psum's backward is a second extra one).")
    print("Dry mode needs no process group and no memory, so this runs before any launch, for")
    print("any world size (up to 16 ranks traced separately).")


# -- (c) ------------------------------------------------------------------------------------------
def section_c() -> None:
    header("(c) Caught at run time: shardlang run, with and without --launch-anyway")
    args = ("run", "models.debugging:rank_branch", "--mesh", MESH, "--steps", "1",
            "--timeout", str(LAUNCH_TIMEOUT))
    print(command(*args))
    rc, out, secs = shardlang(*args)
    first = out.splitlines()
    print(f"exit code {rc} after {secs:.1f} s:")
    print(f"  {first[0]}")
    print(f"  {unwrap(out, 'ranks 0 and 1', 'hang here.')}")
    refusal = next((line for line in first if line.startswith("not launching")), "")
    print(f"  {refusal}")
    if rc != 2 or first[0] != "pre-launch check: a hang is predicted" or not refusal \
            or "launching torchrun" in out:
        raise SystemExit("run did not refuse to launch the predicted hang")
    print("run traces every rank in dry mode first (the same check as explain --all-ranks);")
    print("a predicted hang is not launched. --launch-anyway launches it regardless:\n")

    rc, keep, secs = launch_anyway("models.debugging:rank_branch")
    errors = [line for line in keep if line.startswith("error:")]
    want = {r: f"error: ranks {r} and {1 - r} (group [0, 1]) disagree at their collective "
               "#1 on tp" for r in (0, 1)}
    both = all(any(e.startswith(w) for e in errors) for w in want.values())
    ok = rc != 0 and both and secs < LAUNCH_TIMEOUT / 2 and \
        all("[] float32 (forward)" in e and "[8, 32, 32] float32 (backward)" in e for e in errors)
    print(f"caught: both ranks stopped at collective #1 with an error naming both ranks and both "
          f"collectives: {'yes' if ok else 'NO'}")
    print(f"elapsed {secs:.1f} s (mostly starting torchrun and two Python processes) of the "
          f"--timeout {LAUNCH_TIMEOUT} s")
    if not ok:
        raise SystemExit("the collective check did not stop rank_branch's run")
    print("Each rank posted its signature to the job's key-value store and read its peer's")
    print("before issuing the all-reduce (op, axis, shape and dtype must agree; the phase and")
    print("site only say where): they differed,")
    print("so each raised CollectiveMismatch at once. No one waited for the check's time limit;")
    print("that limit only matters when a peer never posts at all (see (e)).")


# -- (d) ------------------------------------------------------------------------------------------
def section_d() -> None:
    header("(d) A shape mismatch: models.debugging:uneven (each tp rank psums S - rank tokens)")
    print(command("explain", "models.debugging:uneven", "--mesh", MESH, "--all-ranks"),
          " (here through the Python API)")
    ex, found = predict("models.debugging:uneven")
    d = found[0]
    print(f"  {d}")
    side_by_side(ex.schedules.ranks, d.index,
                 "uneven on tp=2: the same ops in the same order, different shapes at #1")
    ra, rb = d.records
    ok = (len(found) == 1 and d.ranks == (0, 1) and d.index == 1 and ra is not None
          and rb is not None and ra.op == rb.op and ra.phase == rb.phase
          and (ra.shape, rb.shape) == ((8, 32, 32), (8, 31, 32)))
    print(f"predicted: same op and phase, shapes {list(ra.shape)} vs {list(rb.shape)}: "
          f"{'yes' if ok else 'NO'}")
    if not ok:
        raise SystemExit("explain --all-ranks did not predict uneven's shape mismatch")
    print("A size mismatch need not hang: a backend may also read the wrong number of bytes")
    print("and compute garbage. The check compares shapes too.\n")

    rc, keep, secs = launch_anyway("models.debugging:uneven")
    errors = [line for line in keep if line.startswith("error:")]
    ok = (rc != 0 and len(errors) == 2 and secs < LAUNCH_TIMEOUT / 2
          and all("disagree at their collective #1 on tp" in e and "[8, 32, 32]" in e
                  and "[8, 31, 32]" in e for e in errors)
          and {e.split(" (group")[0] for e in errors} == {"error: ranks 0 and 1",
                                                           "error: ranks 1 and 0"})
    print(f"caught: [8, 32, 32] vs [8, 31, 32] at collective #1, on both ranks, in {secs:.1f} s: "
          f"{'yes' if ok else 'NO'}")
    if not ok:
        raise SystemExit("the collective check did not stop uneven's run")


# -- (e) ------------------------------------------------------------------------------------------
_SERVERS: list[dist.TCPStore] = []  # the stores' servers, alive until the lesson ends


def _two_guards(timeout: float) -> list[CollectiveGuard]:
    """Two ranks' guards on one real TCPStore in this process (threads stand in for the
    two processes; the group [0, 1] stands in for the tp process group)."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    _SERVERS.append(master)
    guards = []
    for rank in (0, 1):
        client = dist.TCPStore("127.0.0.1", master.port, is_master=False)
        with mock.patch.object(guard, "default_store", return_value=client):
            guards.append(CollectiveGuard(rank, timeout=timeout))
    return guards


def _both(guards: list[CollectiveGuard], sigs: list[dict], repeat: int = 1) -> dict[int, str]:
    """Both ranks verify their signature (``repeat`` collectives in a row), each in its
    own thread; each rank's error (or ''). An empty signature: that rank issues none."""
    out = {0: "", 1: ""}

    def one(rank: int) -> None:
        try:
            for _ in range(repeat):
                guards[rank].verify("tp", sigs[rank])
        except CollectiveMismatch as e:
            out[rank] = str(e)
        except Exception as e:  # noqa: BLE001 - reported by the caller's check
            out[rank] = f"unexpected {type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1) if sigs[r]]
    # outside torchrun there is no process group named "tp": say it holds ranks 0 and 1
    with mock.patch.object(guard, "group_ranks", return_value=[0, 1]):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def section_e() -> None:
    header("(e) What the check costs, and how to control it")
    t = Table(title="The knobs (lowering/cli.py, lowering/guard.py, lowering/runtime.py)",
              title_justify="left")
    for col in ("knob", "default", "what it does"):
        t.add_column(col)
    t.add_row("run --check-collectives", "first",
              "check every collective of step 1 (first), of every step (all), or none (off)")
    t.add_row("SHARDLANG_CHECK_TIMEOUT", "60 s",
              "how long a rank waits at a checked collective for each peer to post; then "
              "CollectiveMismatch: 'rank r waited ... never issued ...'")
    t.add_row("SHARDLANG_TIMEOUT", "120 s",
              "the process group's own timeout (init_process_group in each worker): a "
              "collective that never completes fails after this, checked or not")
    t.add_row("run --timeout", "600 s",
              "the whole torchrun launch: killed after it, 'error: torchrun did not finish "
              "within N s', exit 124")
    t.add_row("run --launch-anyway", "off",
              "launch even though the pre-launch dry trace predicts a hang")
    console.print(t)

    print("The mechanism, on a real TCPStore in this process (two threads = ranks 0 and 1):")
    sig = {"op": "all_reduce", "axis": "tp", "shape": [8, 32, 32], "dtype": "float32",
           "phase": "forward", "site": "(model)"}
    guards = _two_guards(timeout=60)
    n = 100
    t0 = time.perf_counter()
    errs = _both(guards, [sig, sig], repeat=n)
    if errs != {0: "", 1: ""}:
        raise SystemExit(f"equal signatures were refused: {errs}")
    per = (time.perf_counter() - t0) / n * 1e3
    print(f"  matching signatures: {n} checked collectives in a row, {per:.2f} ms each "
          "(a set, a wait and a get per peer)")
    scalar = {**sig, "shape": []}
    fresh = _two_guards(timeout=60)
    errs = _both(fresh, [scalar, {**sig, "phase": "backward"}])
    print("  different signatures (rank_branch's pair at #1, as a fresh pair's first "
          f"collective): both ranks raise at once;\n  rank 0's error:\n    {errs[0]}")
    lonely = _two_guards(timeout=1)
    t0 = time.perf_counter()
    late = _both(lonely, [sig, {}])          # rank 1 never issues this collective
    waited = time.perf_counter() - t0
    print(f"  rank 1 never arrives (guard timeout 1 s), rank 0 gives up after {waited:.1f} s:"
          f"\n    {late[0]}")
    ok = (per < 50 and errs[0].startswith("ranks 0 and 1 (group [0, 1]) disagree at their "
                                          "collective #0 on tp")
          and errs[1].startswith("ranks 1 and 0") and 0.9 < waited < 5
          and late[0].startswith("rank 0 waited 1 s at its collective #0 on tp")
          and "rank 1 of the group [0, 1] never issued a collective #0" in late[0])
    if not ok:
        raise SystemExit("the collective guard did not behave as described")

    ex, _ = predict("models.debugging:rank_branch")
    n0 = len(ex.schedules.ranks[0])
    print(f"\nCost: rank_branch's rank 0 issues {n0} collectives per step, so "
          f"--check-collectives first adds {n0} such checks")
    print(f"(~{n0 * per:.1f} ms here, one store round trip per peer each; more across "
          "machines) to the first step only;")
    print("'all' adds them to every step; 'off' adds nothing. A branch taken on every step "
          "shows on step 1;")
    print("a mismatch that only appears later (an uneven last batch) needs 'all'. The "
          "pre-launch dry trace")
    print("runs whatever --check-collectives says; only --launch-anyway gets past it.\n")

    print("And with the check off? The same job, the process group's timeout lowered to 10 s:")
    args = ("run", "models.debugging:rank_branch", "--mesh", MESH, "--steps", "1",
            "--launch-anyway", "--check-collectives", "off", "--timeout", "60")
    print(command(*args, env="SHARDLANG_TIMEOUT=10"))
    rc, out, secs = shardlang(*args, env={"SHARDLANG_TIMEOUT": "10"}, timeout=120)
    said = [line.strip() for line in out.splitlines()
            if "gloo" in line.lower() or line.startswith(("error:", "terminate called"))]
    print(f"exit code {rc} after {secs:.1f} s; what torch says:")
    for line in said[:4]:
        print(f"  {line[:300]}{' ...' if len(line) > 300 else ''}")
    if rc == 0 or "disagree at their collective" in out or secs > 60:
        raise SystemExit("the unchecked run did not fail the way the lesson says")
    print("Here gloo noticed that the two all-reduces differ in size (4 B against 32 KiB)")
    print("and aborted one process; on NCCL, or with equal sizes, the ranks could instead sit")
    print("in the collective until SHARDLANG_TIMEOUT, or silently add mismatched data. Neither")
    print("message says which ranks, which collective or which phase. The check does, for")
    print(f"~{per:.2f} ms per checked collective here, on step 1 only by default.")


def main() -> None:
    t0 = time.perf_counter()
    section_a()
    section_b()
    section_c()
    section_d()
    section_e()
    print(f"\nlesson 08 done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
