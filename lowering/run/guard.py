"""Run mode's collective check: before a rank issues a collective, it posts the
collective's signature to the job's key-value store and waits, with a time limit, for
every rank of the group to post the same one. What must agree is what a real
collective needs to match: the op, the axis (and so the group), the shape, the dtype and
the order (the n-th collective of each group). The phase and the module site only
describe a mismatch: two models may name the same collective differently.

A rank-dependent branch or an uneven batch would otherwise hang the job in the first
collective the ranks disagree on; with the check it ends within the time limit, with a
:class:`CollectiveMismatch` naming both ranks, both collectives and their sites (or, if
a peer never arrives, what that peer was last doing).
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import os

import shardlang as sl
from lowering._torch import default_store, group_ranks
from shardlang.errors import choice

__all__ = ["CheckMode", "CollectiveMismatch", "CollectiveGuard", "check_timeout", "MUST_AGREE"]

#: The parts of a collective's signature that every rank of its group must agree on.
MUST_AGREE = ("op", "axis", "shape", "dtype")


class CheckMode(enum.Enum):
    """Which steps of a run have their collectives checked across each group."""

    FIRST = "first"
    ALL = "all"
    OFF = "off"

    @classmethod
    def parse(cls, name: str | CheckMode) -> CheckMode:
        """``"first"`` -> ``CheckMode.FIRST``; an unknown name is a ShardingError."""
        return choice(cls, name, what="collective-check mode", keyword="check_collectives",
                      flag="--check-collectives")


class CollectiveMismatch(sl.ShardingError):
    """Ranks of one group were about to issue different collectives (a hang, avoided)."""


def check_timeout() -> float:
    """Seconds a rank waits for its group at a checked collective (SHARDLANG_CHECK_TIMEOUT)."""
    return float(os.environ.get("SHARDLANG_CHECK_TIMEOUT", "60"))


def _describe(sig: dict) -> str:
    return (f"{sig['op']} over {sig['axis']} of {sig['shape']} {sig['dtype']} "
            f"({sig['phase']}) at {sig['site']}")


_GUARDS: dict[int, itertools.count] = {}  # rank -> its guards so far


class CollectiveGuard:
    """Checks each collective of this rank against its group's, through the store."""

    def __init__(self, rank: int, prefix: str | None = None, *,
                 timeout: float | None = None) -> None:
        # one key space per run: every rank makes its guards in the same order (one per
        # training run), so runs sharing a process group never read each other's keys
        self.rank = rank
        run = next(_GUARDS.setdefault(rank, itertools.count()))
        self.prefix = prefix if prefix is not None else f"shardlang/check/{run}"
        self.timeout = timeout if timeout is not None else check_timeout()
        self.store = default_store()
        self.count: dict[str, int] = {}

    def verify(self, group_name: str, sig: dict) -> None:
        """Post this rank's signature for the group's next collective; raise
        :class:`CollectiveMismatch` unless every rank of the group posts the same."""
        ranks = group_ranks(group_name)
        n = self.count.get(group_name, 0)
        self.count[group_name] = n + 1
        key = f"{self.prefix}/{group_name}/{n}"
        mine = json.dumps(sig, sort_keys=True)
        self.store.set(f"{key}/{self.rank}", mine)
        self.store.set(f"{self.prefix}/last/{self.rank}", mine)
        for r in ranks:
            if r == self.rank:
                continue
            try:
                self.store.wait([f"{key}/{r}"], datetime.timedelta(seconds=self.timeout))
            except Exception as e:  # noqa: BLE001 - the store's timeout error, reworded
                raise CollectiveMismatch(
                    f"rank {self.rank} waited {self.timeout:.0f} s at its collective #{n} on "
                    f"{sig['axis']} ({_describe(sig)}), but rank {r} of the group "
                    f"{ranks} never issued a collective #{n} on {sig['axis']}; rank {r} was "
                    f"last at: {self._last(r)}. The ranks' programs differ (a rank-dependent "
                    "branch?); a real run would hang here. Compare the ranks' schedules "
                    "with 'shardlang explain ... --all-ranks'") from e
            theirs = json.loads(self.store.get(f"{key}/{r}"))
            if any(theirs.get(k) != sig.get(k) for k in MUST_AGREE):
                raise CollectiveMismatch(
                    f"ranks {self.rank} and {r} (group {ranks}) disagree at their collective "
                    f"#{n} on {sig['axis']}: rank {self.rank} issues {_describe(sig)}; rank "
                    f"{r} issues {_describe(theirs)}. A real run would hang or compute "
                    "garbage here")

    def _last(self, r: int) -> str:
        key = f"{self.prefix}/last/{r}"
        try:
            if self.store.check([key]):
                return _describe(json.loads(self.store.get(key)))
        except Exception:  # noqa: BLE001
            pass
        return "no checked collective yet"
