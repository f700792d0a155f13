"""Search before launch: ``shardlang plan`` ranks every layout of N GPUs by predicted step
time, within memory (:mod:`.search`; the flags and table in :mod:`.command`)."""

from lowering.search.command import add_plan_parser, cmd_plan
from lowering.search.search import Found, Search, profile, search

__all__ = ["Found", "Search", "search", "profile", "add_plan_parser", "cmd_plan"]
