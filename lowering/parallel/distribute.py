"""A model onto the mesh, in place: every parameter becomes a DTensor parameter with the
plan's placements (ties kept), every buffer a copy per simulated rank, then each mesh
axis installs what it runs at use: FSDP's gather (:mod:`.data`) and tensor parallelism's
conversion points (:mod:`.tensor`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import shardlang as sl
from lowering._torch import host_values, own_copy_per_rank, rank_map
from lowering.parallel.fsdp import compute_dtype, install_at_use
from lowering.parallel.local_dp import install_local_dp
from lowering.parallel.tensor import install_tp_hooks
from lowering.plan import Plan

__all__ = ["distribute_model", "distribute_owned", "block_of", "read_whole_weights"]


def distribute_model(model: nn.Module, plan: Plan, dmesh: DeviceMesh) -> nn.Module:
    """Replace every parameter by a DTensor parameter with the plan's placements. A
    pipeline stage's model holds only its own layers; the plan's others are skipped."""
    new: dict[int, nn.Parameter] = {}
    held = dict(model.named_parameters(remove_duplicate=False))
    for p_plan in plan.params:
        if p_plan.name not in held:  # a layer another pipeline stage holds
            continue
        old = held[p_plan.name]
        data = _read_shard(p_plan.name, old, dmesh, p_plan.placements)
        if data is None:
            data = distribute_owned(old.detach(), dmesh, p_plan.placements)
        new[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad)
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[pname] = new[id(p)]
    _own_buffers(model)
    install_at_use(model, plan, dmesh, dtype=compute_dtype(plan.options.precision))
    install_tp_hooks(model, plan)
    install_local_dp(model, plan, dmesh)
    return model


def _own_buffers(model: nn.Module) -> None:
    """In simulate mode every rank gets its own copy of each buffer: a buffer updated in
    place (BatchNorm's running statistics) was otherwise one tensor that every simulated
    rank updated in turn (dp=2 applied the momentum twice a step). No-op in run mode."""
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, DTensor):
                mod._buffers[name] = own_copy_per_rank(b)


def read_whole_weights(model: nn.Module) -> nn.Module:
    """Where nothing is distributed (a pipeline-only mesh: each stage is one device;
    world size 1), read every parameter a factory tagged to be read later
    (:func:`shardlang.read_from`) in full; otherwise it kept its initial values and the
    checkpoint's weights were silently never loaded."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            read = sl.reader_of(p)
            if read is None or p.device.type == "meta":
                continue
            with host_values():
                t = read(tuple(slice(0, n) for n in p.shape))
            if tuple(t.shape) != tuple(p.shape):
                raise sl.ShardingError(
                    f"the weights reader of {name} returned {tuple(t.shape)} for the whole "
                    f"tensor of shape {tuple(p.shape)}; it must return the block asked for")
            p.copy_(t)
            sl.read_from(p, None)  # type: ignore[arg-type]
    return model


def distribute_owned(t: torch.Tensor, dmesh: DeviceMesh,
                     placements: tuple[Placement, ...]) -> DTensor:
    """``t`` (the same on every rank) as a DTensor whose every rank owns its block: in
    simulate mode a replicated block is copied per rank, so in-place updates (the
    optimizer) stay rank-local."""
    data = distribute_tensor(t, dmesh, placements, src_data_rank=None)
    local = own_copy_per_rank(data.to_local())
    if local is not data.to_local():
        data = DTensor.from_local(local, dmesh, placements, run_check=False,
                                  shape=data.shape, stride=data.stride())
    return data


def block_of(shape: torch.Size, dmesh: DeviceMesh, placements: tuple[Placement, ...],
             rank: int) -> tuple[slice, ...]:
    """The block of a tensor of ``shape`` that ``rank`` holds under ``placements``: each
    ``Shard(d)``, in mesh-dim order, splits dim d's current range as ``torch.chunk`` does."""
    coord = (dmesh.mesh == rank).nonzero()[0].tolist()
    ranges = [[0, n] for n in shape]
    for i, p in enumerate(placements):
        if isinstance(p, Shard):
            lo, hi = ranges[p.dim]
            size, n = hi - lo, dmesh.mesh.shape[i]
            chunk = -(-size // n)
            ranges[p.dim] = [lo + min(coord[i] * chunk, size), lo + min((coord[i] + 1) * chunk, size)]
    return tuple(slice(lo, hi) for lo, hi in ranges)


def _read_shard(name: str, old: torch.Tensor, dmesh: DeviceMesh, placements: tuple[Placement, ...]
                ) -> DTensor | None:
    """The parameter as a DTensor whose every rank read only its own block from the
    reader a factory tagged it with (:func:`shardlang.read_from`); None without one."""
    read = sl.reader_of(old)
    if read is None or old.device.type == "meta" or not all(
            type(p) in (Shard, Replicate) for p in placements):
        return None

    def local(rank: int) -> torch.Tensor:
        block = block_of(old.shape, dmesh, placements, int(rank))
        with host_values():  # the reader's own tensor code runs as plain torch
            t = read(block)
        want = tuple(b.stop - b.start for b in block)
        if tuple(t.shape) != want:
            raise sl.ShardingError(
                f"the weights reader of {name} (shape {tuple(old.shape)}) returned "
                f"{tuple(t.shape)} for block {block}; it must return the block asked for")
        return t.to(device=old.device, dtype=old.dtype).contiguous()

    values = rank_map(local)
    if values is None:  # run mode: this process is one rank
        values = local(dist.get_rank())
    return DTensor.from_local(values, dmesh, placements, run_check=False,
                              shape=old.shape, stride=old.stride())
