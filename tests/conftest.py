"""Shared helpers: the CLI in-process, and single-device references."""

from __future__ import annotations

import pytest

import shardlang as sl
from lowering.cli import main
from lowering.run import Layout
from lowering.run.registry import resolve


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``shardlang ARGS`` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def layout(model: str = "gpt-tiny", *, fsdp: bool = False, rules: str = "", **mesh: int) -> Layout:
    return Layout(resolve(model), sl.Mesh(**mesh),
                  sl.Rules.parse(rules, base=sl.Rules.default()), fsdp=fsdp)
