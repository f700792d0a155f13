"""The one error type users see, and the helpers that phrase its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ShardingError", "closest", "divisors", "fmt_spec"]


class ShardingError(ValueError):
    """A sharding layout, annotation or collective the user asked for cannot work.

    Raised at annotation, lowering or trace time (never as a hang). The message says
    what was given, the rule it breaks, the values, and how to fix it.

    Example:
        >>> import shardlang as sl
        >>> try:
        ...     sl.Mesh(xp=2)
        ... except sl.ShardingError as e:
        ...     print("error:", str(e)[:40])
        error: unknown mesh axis 'xp'; the mesh axes
    """


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name`` by spelling, or None when nothing is near."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order (the mesh sizes that divide it)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def fmt_spec(entries: Iterable[object]) -> str:
    """Format spec entries in the notation of the docs: ``P('dp', None, ('dp', 'ep'))``."""
    return "P(" + ", ".join(repr(e) for e in entries) + ")"
