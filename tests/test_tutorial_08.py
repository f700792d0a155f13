"""Lesson 08 runs end to end on CPU: a hang predicted by explain --all-ranks, refused by
run, and stopped by run's collective check (rank_branch and uneven on tp=2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.test_tutorials import ANSI, ROOT

LAUNCH_TIMEOUT = 120  # the lesson's run --timeout for (c) and (d)
OFF_TIMEOUT = 60      # its run --timeout for the unchecked run in (e)

# what rank 0 and rank 1 issue as their collective #1 on tp (from models/debugging.py:
# rank 0's extra psum of a scalar meets rank 1's first backward all-reduce)
BRANCH_0 = "all_reduce over tp of [] float32 (forward) at (model)"
BRANCH_1 = "all_reduce over tp of [8, 32, 32] float32 (backward) at (model)"
# uneven: rank r psums S - r = 32 - r tokens of (8, 32, 32)
UNEVEN_0 = "all_reduce over tp of [8, 32, 32] float32 (forward) at (model)"
UNEVEN_1 = "all_reduce over tp of [8, 31, 32] float32 (forward) at (model)"


def predicted(a: str, b: str) -> str:
    return (f"ranks 0 and 1 (one tp group [0, 1]) diverge at their collective #1 on tp: "
            f"rank 0 issues {a}; rank 1 issues {b}. A real run would hang here.")


def caught(first: int, a: str, b: str) -> str:
    other = 1 - first
    return (f"error: ranks {first} and {other} (group [0, 1]) disagree at their collective "
            f"#1 on tp: rank {first} issues {a}; rank {other} issues {b}. A real run would "
            "hang or compute garbage here")


def section(out: str, letter: str) -> str:
    start = out.index(f"\n({letter}) ")
    nxt = re.search(r"\n\([a-e]\) ", out[start + 1:])
    return out[start:start + 1 + nxt.start()] if nxt else out[start:]


def _run_lesson() -> str:
    # three torchrun launches: more than run_tutorial's 120 s on a busy machine
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tutorials" / "08_finding_a_hang.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return ANSI.sub("", proc.stdout)


def _one_device_is_fine(out: str) -> None:
    a = section(out, "a")
    for name in ("rank_branch", "uneven"):
        assert (f"{name}: token ids (8, 32) -> logits (8, 32, 64); equals the model without "
                "its probe (max error 0.0e+00)") in a
    assert a.count("every gradient finite: True") == 2


def _hang_predicted_before_launch(out: str) -> None:
    b = section(out, "b")
    assert "$ python -m lowering explain models.debugging:rank_branch --mesh tp=2 --all-ranks" in b
    assert "collective check: 1 group(s) would hang; the first:" in b
    # once from the CLI, once from divergences(): the same text
    assert b.count(predicted(BRANCH_0, BRANCH_1)) == 2
    assert "len(found) = 1" in b
    assert "the CLI and the API name the same divergence: yes" in b
    # the side-by-side table: #0 agrees, #1 is where they part, rank 1 has no #2 or #3
    rows = {int(m[0]): m[1] for m in re.findall(r"│ (\d) │(.*)│\s*$", b, re.M)}
    cells = {i: [c.strip() for c in row.split("│")] for i, row in rows.items()}
    assert cells[0] == ["forward", "all_reduce", "[8, 32, 32]"] * 2 + ["same"]
    assert cells[1] == ["forward", "all_reduce", "[]", "backward", "all_reduce", "[8, 32, 32]",
                        "<- first disagreement"]
    assert cells[2][:3] == ["backward", "all_reduce", "[]"] and cells[2][4] == "(none)"
    assert cells[3][:3] == ["backward", "all_reduce", "[8, 32, 32]"] and cells[3][4] == "(none)"
    assert "Rank 0 issues\n4 collectives per step, rank 1 2" in b


def _launches(text: str) -> list[tuple[int, float]]:
    return [(int(rc), float(s)) for rc, s in re.findall(r"exit code (-?\d+) after ([\d.]+) s", text)]


def _run_refuses_then_the_check_stops_it(out: str) -> None:
    c = section(out, "c")
    (rc_refused, _), (rc_run, secs) = _launches(c)
    assert rc_refused == 2
    lines = c.splitlines()
    i = lines.index("  pre-launch check: a hang is predicted")
    assert lines[i + 1] == "  " + predicted(BRANCH_0, BRANCH_1)
    assert lines[i + 2].startswith("  not launching (--launch-anyway launches regardless")
    assert "--launch-anyway --timeout 120" in c and "SHARDLANG_CHECK_TIMEOUT=10 " in c
    # the real run: both ranks name both ranks and both collectives, non-zero, fast
    assert "  launching torchrun: 2 processes for Mesh(tp=2)" in lines
    assert "  " + caught(0, BRANCH_0, BRANCH_1) in lines
    assert "  " + caught(1, BRANCH_1, BRANCH_0) in lines
    assert rc_run != 0
    assert secs < LAUNCH_TIMEOUT / 2, secs
    assert "both collectives: yes" in c
    # torchrun's own failure report is filtered out
    assert "ChildFailedError" not in c and "Traceback" not in c


def _shape_mismatch_predicted_and_caught(out: str) -> None:
    d = section(out, "d")
    assert "  " + predicted(UNEVEN_0, UNEVEN_1) in d.splitlines()
    assert "predicted: same op and phase, shapes [8, 32, 32] vs [8, 31, 32]: yes" in d
    (rc, secs), = _launches(d)
    assert rc != 0 and secs < LAUNCH_TIMEOUT / 2, (rc, secs)
    lines = d.splitlines()
    assert "  " + caught(0, UNEVEN_0, UNEVEN_1) in lines
    assert "  " + caught(1, UNEVEN_1, UNEVEN_0) in lines


def _knobs_mechanism_and_check_off(out: str) -> None:
    e = section(out, "e")
    for knob, default in (("run --check-collectives", "first"),
                          ("SHARDLANG_CHECK_TIMEOUT", "60 s"), ("SHARDLANG_TIMEOUT", "120 s"),
                          ("run --timeout", "600 s")):
        assert re.search(rf"│ {re.escape(knob)}\s*│ {re.escape(default)}\s*│", e), knob
    per = float(re.search(r"100 checked collectives in a row, ([\d.]+) ms each", e)[1])
    assert 0 < per < 50
    assert ("    ranks 0 and 1 (group [0, 1]) disagree at their collective #0 on tp: rank 0 "
            f"issues {BRANCH_0}; rank 1 issues {BRANCH_1}") in e
    waited = float(re.search(r"rank 0 gives up after ([\d.]+) s", e)[1])
    assert 0.9 <= waited < 5
    assert ("rank 0 waited 1 s at its collective #0 on tp (" + UNEVEN_0 + "), but rank 1 of "
            "the group [0, 1] never issued a collective #0 on tp") in e
    assert "--check-collectives first adds 4 such checks" in e
    # with the check off the job still fails (torch's own error), but names no ranks
    assert "--check-collectives off --timeout 60" in e
    (rc, secs), = _launches(e)
    assert rc != 0 and secs < OFF_TIMEOUT, (rc, secs)
    assert "disagree at their collective" not in e.split("And with the check off?")[1]


@pytest.mark.torchrun
def test_lesson_08_end_to_end() -> None:
    """The lesson runs once (three torchrun launches, about a minute); each section's
    checks follow. One test, not five sharing a module fixture: pytest-xdist would run
    that fixture once per worker."""
    out = _run_lesson()
    _one_device_is_fine(out)
    _hang_predicted_before_launch(out)
    _run_refuses_then_the_check_stops_it(out)
    _shape_mismatch_predicted_and_caught(out)
    _knobs_mechanism_and_check_off(out)
