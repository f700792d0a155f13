"""``shardlang calibrate``: measure this machine for the ``cpu`` device profile.

Two micro-benchmarks, one thread (as shardlang's launcher gives each process): the matmul
FLOP/s of square ``torch.matmul`` per dtype, and the bandwidth of ``copy_`` between two
large tensors (read + write bytes per second). The median of a few repeats after one
warm-up. Links (gloo over loopback) are not measured: ``bench`` times real collectives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console

import shardlang as sl
from lowering.plan import DEVICES

__all__ = ["calibrate", "print_calibration", "add_calibrate_parser", "cmd_calibrate"]


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    c = sub.add_parser("calibrate", help="measure this machine's matmul FLOP/s and memory "
                                         "bandwidth (the cpu device profile's figures)")
    c.add_argument("--size", type=int, default=2048, help="matmul size (default 2048)")
    c.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    if args.size < 16:
        raise sl.ShardingError(f"--size {args.size}: use at least 16")
    measured = calibrate(size=args.size)
    if args.json:
        print(json.dumps(measured))
    else:
        print_calibration(measured, console)
    return 0


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(*, size: int = 2048, copy_mib: int = 256, repeats: int = 3) -> dict[str, object]:
    """{"peak_flops": {dtype: FLOP/s}, "hbm_bw": bytes/s, "threads", "size", "copy_bytes"}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(size, size, dtype=dtype)
            b = torch.randn(size, size, dtype=dtype)
            flops[name] = 2 * size ** 3 / _median_seconds(lambda: torch.matmul(a, b), repeats)
        n = copy_mib * 2 ** 20 // 4
        src, dst = torch.randn(n), torch.empty(n)
        bw = 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), repeats)
    finally:
        torch.set_num_threads(threads)
    return {"peak_flops": flops, "hbm_bw": bw, "threads": 1, "size": size,
            "copy_bytes": n * 4}


def print_calibration(measured: dict[str, object], console: Console) -> None:
    stored = DEVICES["cpu"]
    console.print("[bold]This machine, one thread per process[/] (beside the stored "
                  "`cpu` profile in lowering/plan/devices.py):")
    for dtype, v in measured["peak_flops"].items():  # type: ignore[union-attr]
        console.print(f"  matmul {measured['size']}^3 {dtype}: {v / 1e9:.1f} GFLOP/s "
                      f"(profile {stored.peak_flops[dtype] / 1e9:.1f})")
    console.print(f"  copy_ of {measured['copy_bytes'] / 2**20:.0f} MiB: "
                  f"{measured['hbm_bw'] / 1e9:.1f} GB/s read + write "  # type: ignore[operator]
                  f"(profile {stored.hbm_bw / 1e9:.1f})")
