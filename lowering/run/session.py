"""Process groups and device meshes for the three execution modes.

Device selection lives here and only here: ``cuda`` + ``nccl`` when CUDA is available,
else ``cpu`` + ``gloo``. Dry and simulate modes use the ``fake`` backend (no
communication; simulate adds ``LocalTensorMode`` so every rank's values live in this
process).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import shardlang as sl
from lowering._torch import forget_dtensor_caches, init_fake, local_tensor_mode, module_tracker
from lowering.plan import KnownValues, tensor_axes
from lowering.schedule.recorder import running_module

__all__ = ["Mode", "Session", "session", "device_and_backend", "under_torchrun", "stage_mesh",
           "group_axes", "process_group_closed", "let_backend_threads_finish"]

#: A collective that waits longer than this fails instead of hanging (run mode).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("SHARDLANG_TIMEOUT", "120")))


class Mode(enum.Enum):
    DRY = "dry"
    SIMULATE = "simulate"
    RUN = "run"


def device_and_backend() -> tuple[str, str]:
    """The one place that picks the device: (``cuda``, ``nccl``) or (``cpu``, ``gloo``)."""
    if torch.cuda.is_available():
        return "cuda", "nccl"
    return "cpu", "gloo"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


@dataclass
class Session:
    """A live process group and device mesh for one mode."""

    mode: Mode
    mesh: sl.Mesh
    rank: int
    device: str
    dmesh: DeviceMesh | None
    pp_group: dist.ProcessGroup | None = None  # run mode with pp > 1

    @property
    def world(self) -> int:
        return self.mesh.size

    @property
    def stage_world(self) -> int:
        """Ranks of one pipeline stage: what dry and simulate modes run as one SPMD world
        (global rank = pp coordinate * stage_world + local rank)."""
        return self.mesh.size // self.mesh.pp


def _device_mesh(mesh: sl.Mesh, device: str) -> tuple[DeviceMesh | None, dist.ProcessGroup | None]:
    """The DTensor mesh (every axis > 1 but pp) and, with pp > 1, this rank's pp group."""
    axes = tensor_axes(mesh)
    if mesh.pp == 1:
        if not axes:
            return None, None
        return init_device_mesh(device, tuple(mesh.axis_size(a) for a in axes),
                                mesh_dim_names=axes), None
    full = ("pp", *axes)
    dm = init_device_mesh(device, tuple(mesh.axis_size(a) for a in full), mesh_dim_names=full)
    return (dm[axes] if axes else None), dm.get_group("pp")


def stage_mesh(mesh: sl.Mesh) -> sl.Mesh:
    """The mesh of one pipeline stage (pp dropped)."""
    return sl.Mesh(**{a: mesh.axis_size(a) for a in ("dp", "ep", "sp", "tp")})


@contextlib.contextmanager
def process_group_closed() -> Iterator[None]:
    """Destroy the default process group when the block ends. After a clean end every
    rank first meets at a barrier: a rank tearing gloo down while a peer still finishes
    its last collective aborts the peer (seen: ``terminate called without an active
    exception``, SIGABRT, about 1 launch in 6). After an error there is no barrier: a
    failed peer would never arrive."""
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
        let_backend_threads_finish()


def let_backend_threads_finish() -> None:
    """Release the GIL a moment before the interpreter may exit. A gloo worker thread
    destroys a finished collective's work object after the caller has its result; when
    that drops the last reference to a tensor with a Python object it takes the GIL, and
    a thread taking the GIL while the interpreter finalizes is ended by ``pthread_exit``,
    whose unwind through C++ code aborts the process (``terminate called without an
    active exception``, SIGABRT; a core of it shows ``~AsyncAllgatherWork`` in
    ``ProcessGroupGloo::runLoop`` waiting in ``take_gil`` while the main thread is in
    ``Py_FinalizeEx``; about 1 launch in 25 on this machine under load)."""
    time.sleep(0.2)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """The default process group. After a torchrun restart (``--max-restarts``) the job's
    store still holds the dead round's addresses, which gloo would try to connect to: a
    restarted round keys its group under its own prefix."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=dist.PrefixStore(f"shardlang-restart-{restart}", store),
                            rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


@contextlib.contextmanager
def session(mesh: sl.Mesh, mode: Mode, *, rank: int = 0) -> Iterator[Session]:
    """Set up (and tear down) the process group a mode needs."""
    if mode is Mode.RUN and dist.is_initialized():
        # inside a torchrun job that made its own process group: use it, leave it alive
        if dist.get_world_size() != mesh.size:
            raise sl.ShardingError(
                f"mesh {mesh!r} has {mesh.size} ranks but the process group has "
                f"{dist.get_world_size()}; launch {mesh.size} processes or change the mesh")
        device, _ = device_and_backend()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        forget_dtensor_caches()
        yield Session(mode, mesh, dist.get_rank(), device, *_device_mesh(mesh, device))
        return
    if dist.is_initialized():
        raise sl.ShardingError(
            f"a {mode.value} session needs its own process group, but one is already "
            "initialized in this process; call lowering from a fresh process"
        )
    forget_dtensor_caches()
    if mode is Mode.RUN:
        device, backend = device_and_backend()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != mesh.size:
            raise sl.ShardingError(
                f"mesh {mesh!r} has {mesh.size} ranks but {world} processes were launched; "
                f"launch {mesh.size} processes (torchrun --nproc-per-node {mesh.size}) or "
                f"change the mesh"
            )
        rank = int(os.environ.get("RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group(backend, rank, world)
        with process_group_closed():
            yield Session(mode, mesh, rank, device, *_device_mesh(mesh, device))
        return
    if not 0 <= rank < mesh.size:
        raise sl.ShardingError(f"--rank {rank} is outside {mesh!r} (ranks 0..{mesh.size - 1})")
    hook = sys.excepthook  # init_process_group wraps it with a rank prefix each time
    # one SPMD world per pipeline stage: every stage's program runs on the same local ranks
    local = stage_mesh(mesh)
    init_fake(rank % local.size, local.size)
    try:
        dmesh, _ = _device_mesh(local, "cpu")
        if mode is Mode.SIMULATE:
            with local_tensor_mode(local.size):
                yield Session(mode, mesh, rank, "cpu", dmesh)
        else:  # dry: meta tensors, with known values for what shapes and constants decide
            tracker = module_tracker()
            with tracker, KnownValues(lambda: running_module(tracker.parents) or "the model"):
                yield Session(mode, mesh, rank, "cpu", dmesh)
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def group_axes(sess: Session) -> dict[str, tuple[str, int]]:
    """Process-group name -> (mesh axis, group size), for the recorder."""
    dm = sess.dmesh
    out = {} if dm is None else {dm.get_group(a).group_name: (a, dm.size(i))
                                 for i, a in enumerate(dm.mesh_dim_names or ())}
    if sess.pp_group is not None:
        out[sess.pp_group.group_name] = ("pp", sess.mesh.pp)
    return out
