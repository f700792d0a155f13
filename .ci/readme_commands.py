"""Print the README's first N shell commands (``$ shardlang ...`` lines), one per line.

CI runs them in the fresh virtual environment it made from the README's set-up, so a
dependency the README's install misses fails CI (a test checks this list is not empty).
"""

from __future__ import annotations

import sys
from pathlib import Path


def commands(readme: Path, n: int) -> list[str]:
    out = []
    for line in readme.read_text().splitlines():
        if line.startswith("$ shardlang "):
            out.append(line[2:].strip())
    return out[:n]


if __name__ == "__main__":
    for c in commands(Path(__file__).resolve().parents[1] / "README.md", int(sys.argv[1])):
        print(c)
