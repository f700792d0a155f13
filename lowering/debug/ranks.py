"""Ranks by name: ``[r5 pp=1 dp=0 tp=1]`` prefixes, and printing from every rank of a real
run in rank order."""

from __future__ import annotations

import torch.distributed as dist

import shardlang as sl

__all__ = ["rank_prefix", "print_ranks"]


def rank_prefix(mesh: sl.Mesh, rank: int) -> str:
    """``[r5 pp=1 dp=0 tp=1]``: a rank and its coordinate on every axis of size > 1."""
    coord = mesh.coordinate(rank)
    return "[r" + " ".join([str(rank)] + [f"{a}={coord[a]}" for a in mesh.shape]) + "]"


def print_ranks(text: str, mesh: sl.Mesh) -> None:
    """Print ``text`` from every rank of a torchrun job, in rank order, each line with
    its rank prefix (a collective over the default group: call it on every rank; rank 0
    prints). Outside a process group, prints with rank 0's prefix.

    Example (in a torchrun worker)::

        print_ranks(f"loss {loss.item():.4f}", layout.mesh)
        # [r0 dp=0 tp=0] loss 5.5441
        # [r1 dp=0 tp=1] loss 5.5441 ...
    """
    if not dist.is_initialized():
        everyone: list[str | None] = [text]
    else:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, text)
        if dist.get_rank() != 0:
            return
    for r, t in enumerate(everyone):
        for line in (t or "").splitlines() or [""]:
            print(f"{rank_prefix(mesh, r)} {line}", flush=True)
