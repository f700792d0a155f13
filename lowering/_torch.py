"""Every private or experimental torch API lowering uses, each behind a function of ours.

A torch upgrade that moves one of these touches this file only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel

__all__ = [
    "funcol", "LocalTensor", "LocalTensorMode", "ModTracker", "implicit_replication",
    "loss_parallel", "in_backward", "rank_values", "local_tensor_mode", "init_fake", "per_rank",
    "host_values", "own_copy_per_rank", "forget_dtensor_caches", "rank_index",
    "interleaved_order", "default_store", "group_ranks",
]


def in_backward() -> bool:
    """True while the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def rank_values(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Each simulated rank's value of a (possibly LocalTensor) plain tensor."""
    if isinstance(t, LocalTensor):
        return [t._local_tensors[r] for r in range(world)]
    return [t] * world


@contextlib.contextmanager
def local_tensor_mode(world: int) -> Iterator[LocalTensorMode]:
    """All ``world`` ranks inside this process (simulate mode)."""
    with LocalTensorMode(world) as mode:
        yield mode


def own_copy_per_rank(t: torch.Tensor) -> torch.Tensor:
    """In simulate mode, a plain tensor shared by all ranks becomes one copy per rank
    (a LocalTensor), so in-place updates (the optimizer) stay rank-local."""
    from torch.distributed._local_tensor import enabled_local_tensor_mode

    lm = enabled_local_tensor_mode()
    if lm is None or isinstance(t, LocalTensor):
        return t
    return lm.rank_map(lambda r: t.detach().clone())


def host_values() -> contextlib.AbstractContextManager:
    """Suspend simulate mode's LocalTensorMode: plain tensors made here are ordinary,
    the same on every rank (data batches must not be drawn per simulated rank)."""
    from torch.distributed._local_tensor import maybe_disable_local_tensor_mode

    return maybe_disable_local_tensor_mode()


def forget_dtensor_caches() -> None:
    """Drop DTensor's sharding-propagation caches. Their keys compare meshes by shape and
    names only, so after a process group is torn down and another made (one session
    after another in one process) a cached spec could still name the old groups."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()


def init_fake(rank: int, world: int) -> None:
    """A process group that issues no communication (dry and simulate modes)."""
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)


def per_rank(func):  # noqa: ANN001, ANN201
    """Run a side-effect-free, rank-dependent function once per simulated rank (simulate
    mode) or once (dry and run modes); results combine into per-rank values."""
    from torch.distributed._local_tensor import maybe_run_for_local_tensor

    return maybe_run_for_local_tensor(func)


def rank_index(sub) -> torch.Tensor:  # noqa: ANN001
    """This rank's index in a one-dimensional mesh, as a 0-d tensor (one value per
    simulated rank in simulate mode)."""
    return per_rank(lambda r: torch.tensor(int(r)))(sub.get_local_rank())


def interleaved_order(pp: int, virtual: int, microbatches: int,
                      rank: int) -> list[tuple[int, str, int]]:
    """``ScheduleInterleaved1F1B``'s action order (with its sends and receives) for one
    pipeline rank, as (stage index, action name, microbatch). Built from stand-in stages:
    the order depends only on the pipeline's sizes."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    class _Sizes:  # what the schedule reads from its stages to plan the order
        def __init__(self, index: int) -> None:
            self.stage_index, self.num_stages = index, pp * virtual
            self.group_size, self.group_rank = pp, rank
            self.is_first, self.is_last = index == 0, index == pp * virtual - 1

    sched = ScheduleInterleaved1F1B([_Sizes(rank + k * pp) for k in range(virtual)],
                                    microbatches)
    return [(a.stage_index, a.computation_type.name, a.microbatch_index or 0)
            for a in sched.pipeline_order_with_comms[rank]
            if a is not None]


def default_store():  # noqa: ANN201
    """The default process group's key-value store (run mode's rendezvous store)."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def group_ranks(group_name: str) -> list[int]:
    """The global ranks of a process group, from its name."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_process_group_ranks(_resolve_process_group(group_name))
