"""The one error type users see, and the helpers that phrase its messages."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable
from typing import Self, TypeVar

__all__ = ["ShardingError", "ShardingWarning", "Choice", "closest", "divisors", "fmt_spec", "choice"]

_E = TypeVar("_E", bound=enum.Enum)


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


class ShardingWarning(UserWarning):
    """A layout that works but probably not as meant (an axis that shards nothing).

    The CLI prints it as one ``warning:`` line; in Python it is an ordinary warning
    (``warnings.simplefilter("error", sl.ShardingWarning)`` turns it into an error).
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


class Choice(enum.Enum):
    """An enum of names a user picks by keyword and flag (``Schedule``, ``Phase``...):
    ``parse`` takes a member or its name, ``str()`` is the name. A subclass says how
    errors name it: ``class Schedule(Choice, what="pipeline schedule",
    keyword="schedule", flag="--schedule")``."""

    def __init_subclass__(cls, *, what: str = "", keyword: str = "", flag: str = "",
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._named = (what, keyword, flag)

    @classmethod
    def parse(cls, name: object) -> Self:
        """The member ``name`` names (case-insensitive); anything else is a ShardingError
        naming the keyword, the flag and the closest name."""
        what, keyword, flag = cls._named
        return choice(cls, name, what=what, keyword=keyword, flag=flag)

    def __str__(self) -> str:
        return str(self.value)


def choice(kind: type[_E], value: object, *, what: str, keyword: str, flag: str) -> _E:
    """The member of an enum of names (``Schedule``, ``Phase``...) that ``value`` names;
    anything else is a ShardingError naming the keyword, the flag and the closest name."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if member.value == str(value).lower():
            return member
    names = [str(m.value) for m in kind]
    hint = closest(str(value), names)
    near = f"; did you mean {hint!r}?" if hint else ""
    raise ShardingError(
        f"unknown {what} {value!r} ({keyword}={value!r}, {flag} {value}); choose one of "
        f"{', '.join(names)}{near}")
