"""``shardlang bench MODEL --mesh M --predict [DEVICE]``: the predicted step beside the
measured one.

The prediction is ``explain --device DEVICE``'s (:mod:`lowering.plan.time`, on a dry
trace of the same layout, default device ``cpu``: this machine's measured profile); the
measurement is one ``bench --json`` launch. The table prints both step times, the
error ``(predicted - measured) / measured``, and each side's compute and time per mesh
axis, so a wrong term shows where it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from lowering.bench.scale import launch_json
from lowering.plan import Predicted, device
from lowering.run.modes import Layout, explain

__all__ = ["run_predicted", "print_predicted", "error_of"]


def error_of(predicted: float, measured: float) -> float:
    """The prediction's relative error (positive: it predicts slower than measured)."""
    return (predicted - measured) / measured if measured else 0.0


def run_predicted(layout: Layout, argv: Sequence[str], device_name: str, *,
                  timeout: float) -> dict:
    """Predict, then measure: bench's entry plus ``predicted`` (explain's JSON) and
    ``error`` (the median step's)."""
    dev = device(device_name)
    pred: Predicted = explain(layout).predict(dev)
    entry = launch_json(argv, mesh=None, batch=None, timeout=timeout, what="--predict")
    entry["predicted"] = {"device": dev.name, **pred.json()}
    entry["error"] = error_of(pred.step_s, entry["step_s"]["median"])
    return entry


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def print_predicted(entries: list[dict], console: Console) -> None:
    """Predicted against measured, one row per layout, and the mean and max |error|."""
    t = Table(title="predicted (explain --device) vs measured (bench: median step)")
    for col in ("layout", "predicted", "measured", "error", "predicted compute / axes",
                "measured compute / axes"):
        t.add_column(col)
    for e in entries:
        p = e["predicted"]
        t.add_row(e["mesh"] + (" fsdp" if e["fsdp"] else ""), _ms(p["step_s"]),
                  _ms(e["step_s"]["median"]), f"{e['error']:+.0%}",
                  " ".join([f"compute {_ms(p['compute_s'])}",
                            *(f"{a} {_ms(s)}" for a, s in p["axis_s"].items())]),
                  " ".join([f"compute {_ms(e['compute_s'])}",
                            *(f"{a} {_ms(s)}" for a, s in e["axis_s"].items())]))
    console.print(t)
    errs = [abs(e["error"]) for e in entries]
    console.print(f"|error|: mean {sum(errs) / len(errs):.0%}, max {max(errs):.0%} over "
                  f"{len(errs)} layout(s) on {entries[0]['predicted']['device']}")
