"""Schedules as data: records, totals and JSON (:mod:`.records`) and the recorder that
logs every collective a rank issues in one step (:mod:`.recorder`)."""

from lowering.schedule.recorder import COLLECTIVES, CollectiveCheck, Recorder, logical, site
from lowering.schedule.records import (Cost, Op, Phase, RankSchedules, Record, schedule_json, totals,
                                       wire_bytes)

__all__ = ["Phase", "Op", "Record", "Cost", "RankSchedules", "wire_bytes", "schedule_json",
           "totals", "COLLECTIVES", "Recorder", "CollectiveCheck", "site", "logical"]
