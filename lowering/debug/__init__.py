"""Rank-local debugging: see which rank holds which block (:mod:`.show`), every rank's
value at a site (:mod:`.inspect`), ordered per-rank output (:mod:`.ranks`), and schedule
divergences, a hang found before launch (:mod:`.hangs`), memory per rank predicted and
measured (:mod:`.memory`), the predicted step (:mod:`.predict`). Run mode's collective check
lives in :mod:`lowering.run.guard` (run mode installs it) and is re-exported here."""

from lowering.debug.hangs import Divergence, divergences, print_divergences
from lowering.debug.memory import (fit, memory_mismatches, memory_table, predict_and_measure,
                                    print_memory, print_memory_check)
from lowering.debug.predict import print_predicted, seconds
from lowering.debug.inspect import Inspection, describe_value, inspect, print_inspection
from lowering.debug.ranks import print_ranks, rank_prefix
from lowering.debug.show import Block, blocks, sharding_of, show_sharding
from lowering.run.guard import CollectiveGuard, CollectiveMismatch

__all__ = ["Block", "blocks", "show_sharding", "sharding_of", "rank_prefix", "print_ranks",
           "Inspection", "inspect", "print_inspection", "describe_value", "Divergence",
           "divergences", "print_divergences", "CollectiveGuard", "CollectiveMismatch",
           "memory_table", "print_memory", "print_memory_check", "predict_and_measure",
           "memory_mismatches", "fit", "print_predicted", "seconds"]
