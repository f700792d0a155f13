"""Checkpoints with torch DCP: model, optimizer, LR scheduler, step, RNG and ``extra``.

DCP stores every tensor as global chunks, so a checkpoint saved on one layout loads on
any other (dp=2 x tp=2 -> tp=4, FSDP -> tp, ep=2 -> ep=1): each rank reads the parts of
the chunks its own blocks need. In run mode every rank writes its own blocks; in
simulate and single mode this process writes whole tensors (the same file format).

A checkpoint is written into ``DIR.partial`` and renamed to ``DIR`` only after every rank
has finished, with ``shardlang.pt`` (step, names and shapes, RNG, extra) written last: a
directory without it, or a ``.partial`` one, is never taken for a good checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

import shardlang as sl
from lowering._torch import (host_values, rank_values, set_simulated_rng_states,
                             simulated_rng_states)
from lowering.parallel.distribute import distribute_owned



class Parallel(Protocol):  # what a checkpoint needs of lowering.Parallel
    model: torch.nn.Module
    mesh: sl.Mesh
    mode: str
    rank: int
    recorder: object
    checkpoint_extra: dict
    # optional ``peers``: the other pipeline stages' models this process holds (the
    # built-in loop's simulate mode: one model per stage), pooled for the shape check

__all__ = ["save", "load", "latest_checkpoint", "META"]

META = "shardlang.pt"


def _shapes(par: Parallel) -> dict[str, tuple[int, ...]]:
    """Every parameter's global shape, over all ranks: in run mode a pipeline stage's
    process holds only its own layers, so the processes pool what they hold."""
    have = {n: tuple(p.shape) for n, p in par.model.named_parameters()}
    for peer in getattr(par, "peers", ()):  # this process's other pipeline stages
        have |= {n: tuple(p.shape) for n, p in peer.named_parameters()}
    if par.mode != "run" or par.mesh.pp == 1:
        return have
    every: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, have)
    return {n: s for part in every for n, s in part.items()}


def _names(par: Parallel) -> dict[int, str]:
    return {id(p): n for n, p in par.model.named_parameters()}


def _host(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Simulate and single mode: the whole tensor as one plain tensor (rank 0's copy)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return rank_values(full.detach(), 1)[0].clone()


def _tensors(par: Parallel, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    names = _names(par)
    out = {f"model.{n}": p.detach() for n, p in par.model.named_parameters()}
    if optimizer is not None:
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"optim.{names[id(p)]}.{k}"] = v.detach()
    if par.mode != "run":
        paused = par.recorder.paused() if par.recorder is not None else contextlib.nullcontext()
        with paused:
            out = {k: _host(v, par) for k, v in out.items()}
    return out


def save(par: Parallel, directory: str | os.PathLike, *, step: int,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
         scheduler: object = None, asynchronous: bool = False) -> None:
    final = Path(directory)
    tmp = final.with_name(final.name + ".partial")
    run = par.mode == "run"
    if par.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # an earlier interrupted save
    if run:
        dist.barrier()
    state = _tensors(par, optimizer)
    shapes = _shapes(par)
    with _quiet(not run):
        if asynchronous:
            future = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=not run)
            future.result()  # DCP staged the tensors; what is left is the rename below
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not run)
    if run:
        dist.barrier()  # every rank's blocks are on disk
    # simulate mode keeps one generator per simulated rank inside LocalTensorMode, beside
    # the host's (data drawn under host_values): both are saved
    ranks = simulated_rng_states()
    with host_values():
        rng = {"host": torch.get_rng_state(), "ranks": ranks}
    if par.rank == 0:
        groups = optimizer.state_dict()["param_groups"] if optimizer is not None else None
        torch.save({"step": int(step), "extra": extra or {}, "param_groups": groups,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "shapes": shapes,
                    "mesh": str(par.mesh), "rng": rng}, tmp / META)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    if run:
        dist.barrier()


@contextlib.contextmanager
def _quiet(no_dist: bool) -> Iterator[None]:
    """One process writing whole tensors is what we ask DCP for: not worth its warning
    that no process group is in use."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest_checkpoint(directory: str | os.PathLike) -> Path:
    """``directory`` itself when it is a complete checkpoint, else the complete one under
    it with the highest step; a ShardingError when there is none."""
    d = Path(directory)
    if (d / META).exists():
        return d
    if not d.exists():
        partial = d.with_name(d.name + ".partial")
        why = (f" (only {partial} exists: its save was interrupted)" if partial.exists() else "")
        raise sl.ShardingError(
            f"no checkpoint at {d}{why}; give the directory par.save() wrote (or a folder "
            "of them), or start afresh without par.load()")
    found = sorted((c for c in d.iterdir() if (c / META).exists()),
                   key=lambda c: torch.load(c / META, weights_only=True)["step"])
    if not found:
        partial = [c.name for c in d.iterdir() if c.name.endswith(".partial") or c.is_dir()]
        raise sl.ShardingError(
            f"{d} holds no complete checkpoint (a complete one has {META}, written last"
            + (f"; found only {', '.join(sorted(partial))}, whose saves did not finish"
               if partial else "") + "); resume from an earlier checkpoint or start afresh")
    return found[-1]


def load(par: Parallel, directory: str | os.PathLike, *,
         optimizer: torch.optim.Optimizer | None = None, scheduler: object = None) -> int:
    path = latest_checkpoint(directory)
    with host_values():  # its tensors (RNG states) plain, not one per simulated rank
        meta = torch.load(path / META, weights_only=True)
    _check_same_model(par, meta, path)
    run = par.mode == "run"
    params = dict(par.model.named_parameters())
    targets: dict[str, torch.Tensor] = {}
    with host_values():  # plain tensors, not one per simulated rank
        for n, p in params.items():
            targets[f"model.{n}"] = p.detach() if run else torch.empty(p.shape, dtype=p.dtype)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    optim_keys = [k for k in stored if k.startswith("optim.")]
    if optimizer is not None:
        if not optim_keys and meta["param_groups"] is not None:
            raise sl.ShardingError(f"the checkpoint {path} holds no optimizer state")
        for k in optim_keys:
            n, _, field = k[len("optim."):].rpartition(".")
            if n not in params:  # another pipeline stage's parameter
                continue
            p = params[n]
            shape = tuple(stored[k].size)
            with host_values():
                if shape == tuple(p.shape):
                    targets[k] = torch.zeros_like(p.detach()) if run else \
                        torch.empty(p.shape, dtype=stored[k].properties.dtype)
                else:
                    targets[k] = torch.zeros(shape, dtype=stored[k].properties.dtype)
    with host_values(), _quiet(not run):
        dcp.load(targets, checkpoint_id=str(path), no_dist=not run)
    with torch.no_grad():
        for n, p in params.items():
            if not run:
                p.copy_(_onto(targets[f"model.{n}"], p))
    if optimizer is not None:
        _load_optimizer(par, optimizer, targets, meta, params)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    _restore_rng(meta["rng"])
    par.checkpoint_extra = meta["extra"]
    return int(meta["step"])


def _restore_rng(rng: object) -> None:
    """The host generator and, in simulate mode, each simulated rank's (a checkpoint
    from before per-rank states holds the host's state alone, or None)."""
    if isinstance(rng, torch.Tensor):
        rng = {"host": rng, "ranks": None}
    if rng is None:
        return
    with host_values():
        torch.set_rng_state(rng["host"])
    if rng["ranks"] is not None:
        set_simulated_rng_states(rng["ranks"])


def _onto(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor as ``like`` lays it out (each simulated rank its block)."""
    if isinstance(like, DTensor):
        return distribute_owned(full.to(like.dtype), like.device_mesh, tuple(like.placements))
    return full.to(like.dtype)


def _load_optimizer(par: Parallel, optimizer: torch.optim.Optimizer,
                    targets: dict[str, torch.Tensor], meta: dict,
                    params: dict[str, torch.Tensor]) -> None:
    names = _names(par)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i, p in enumerate(order):
        n = names[id(p)]
        for k, v in targets.items():
            if k.startswith(f"optim.{n}.") and k.count(".") == n.count(".") + 2:
                field = k.rsplit(".", 1)[1]
                value = v if par.mode == "run" or tuple(v.shape) != tuple(p.shape) else _onto(v, p)
                state.setdefault(i, {})[field] = value
    groups = meta["param_groups"]
    if groups is None or len(groups) != len(optimizer.param_groups):
        raise sl.ShardingError(
            f"the checkpoint's optimizer had {0 if groups is None else len(groups)} parameter "
            f"groups, this one has {len(optimizer.param_groups)}; build the optimizer as the "
            "saving run did")
    # the hyperparameters as saved, over this optimizer's own parameters (a pipeline
    # stage's process holds a part of them)
    start, own = 0, []
    for saved, mine in zip(groups, optimizer.param_groups):
        own.append({**saved, "params": list(range(start, start + len(mine["params"])))})
        start += len(mine["params"])
    optimizer.load_state_dict({"state": state, "param_groups": own})


def _check_same_model(par: Parallel, meta: dict, path: Path) -> None:
    have = _shapes(par)
    saved = {n: tuple(s) for n, s in meta["shapes"].items()}
    if have == saved:
        return
    missing = sorted(set(saved) - set(have))
    new = sorted(set(have) - set(saved))
    shapes = [f"{n} {saved[n]} -> {have[n]}" for n in sorted(set(have) & set(saved))
              if have[n] != saved[n]]
    parts = ([f"not in this model: {', '.join(missing[:4])}"] if missing else []) + \
        ([f"not in the checkpoint: {', '.join(new[:4])}"] if new else []) + \
        ([f"other shapes: {', '.join(shapes[:4])}"] if shapes else [])
    raise sl.ShardingError(
        f"the checkpoint {path} is of another model ({'; '.join(parts)}); load it into the "
        "model that saved it (same architecture and config), on any mesh")
