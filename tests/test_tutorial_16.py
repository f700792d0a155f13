"""Lesson 16 (choosing a layout) runs end to end and its claims hold: the search's winner
is the layout explain predicts fastest, and nodes of 2 GPUs keep tp within a node."""

from __future__ import annotations

import re

import pytest

from tests.test_tutorials import run_tutorial

pytestmark = pytest.mark.timeout(300)


def test_16_choosing_a_layout() -> None:
    out = run_tutorial("16_choosing_a_layout.py")
    assert "one GPU fits: False" in out
    assert re.search(r"\n\d+ layouts of 32 GPUs pass the shape checks", out)
    ranked = re.findall(r"#(\d) (\S+(?: \([^)]*\))?)\s+([\d.]+) s/step", out)
    assert [r[0] for r in ranked] == ["1", "2", "3"], out
    steps = [float(r[2]) for r in ranked]
    assert steps == sorted(steps)  # fastest first
    said = re.search(r"explain --device h100-80gb on the winner predicts ([\d.]+) s: the same "
                     r"number", out)
    assert said and float(said.group(1)) == steps[0]
    two = re.search(r"best with 2 GPUs per node: (\S+)", out)
    assert two, out
    tp = re.search(r"tp=(\d+)", two.group(1))
    assert tp is None or int(tp.group(1)) <= 2  # tp stays inside a node of 2
