"""Every private or experimental torch API lowering uses, each behind a name of ours.

A torch upgrade that moves one of these touches this file only. Nothing else in the
project imports a ``torch.*._private`` module or reads a private attribute.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed._functional_collectives as _funcol
from torch.distributed._local_tensor import (
    LocalTensor,
    LocalTensorMode,
    enabled_local_tensor_mode,
    maybe_disable_local_tensor_mode,
    maybe_run_for_local_tensor,
)
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.distributed_c10d import _get_default_store, _resolve_process_group
from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "TorchDispatchMode", "ModTracker", "implicit_replication", "loss_parallel",
    "in_backward", "is_higher_order", "op_name", "is_functional_collective", "draws_random",
    "tree_flatten", "tree_unflatten", "tree_leaves", "tree_map",
    "all_to_all_single", "all_reduce_sum", "all_reduce_async", "at_backward_end", "wait",
    "storage_shared", "all_gather_rows", "reduce_scatter_rows", "dtensor_of",
    "is_wrapper_subclass", "local_block", "dtensor_like",
    "rank_values", "local_tensor_mode", "own_copy_per_rank", "host_values", "per_rank",
    "rank_index", "forget_dtensor_caches", "init_fake", "interleaved_order", "default_store",
    "group_ranks", "module_tracker", "tracker_snapshot", "register_cpu_sdpa",
    "instrument_pipeline_stage", "quiet_dtensor_warnings", "free_storage", "refill_storage",
    "storage_freed", "storage_blocks", "sdpa", "CPU_FLASH", "CPU_FLASH_BACKWARD", "ATTENTION_OPS",
    "dtensor_op_handlers", "optimizer_step_hooks", "fused_attention_block",
    "fused_attention_block_backward",
    "loss_parallel_active",
]


# -- dispatch ---------------------------------------------------------------------------------
def in_backward() -> bool:
    """True while the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def is_higher_order(func: object) -> bool:
    """A higher-order operator (seen by a dispatch mode, passed through untouched)."""
    return isinstance(func, torch._ops.HigherOrderOperator)


def op_name(func: Any) -> str:
    """An aten/c10d op's name without its namespace and overload (``all_reduce``)."""
    return str(func._opname)


def draws_random(func: Any, args: Sequence[Any], kwargs: dict) -> bool:
    """Whether this aten call draws random numbers: a seeded op, unless its dropout
    probability argument (an attention kernel's ``dropout_p``) is zero."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name in ("dropout_p", "p"):
            value = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
            return bool(value)
    return True


def is_functional_collective(func: Any) -> bool:
    """An op of torch's functional collectives (``_c10d_functional``)."""
    return getattr(func, "namespace", "") == "_c10d_functional"


tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_map = _pytree.tree_map


def tree_leaves(tree: Any) -> list[Any]:
    """``torch.utils._pytree.tree_leaves``, in the same order, with plain tuples, lists and
    dicts walked here (an op's arguments, on every dispatched op of a dry trace: pytree's
    general walk was a tenth of a 70B trace); any other node type goes to pytree."""
    out: list[Any] = []
    _leaves_into(tree, out)
    return out


def _leaves_into(x: Any, out: list[Any]) -> None:
    t = type(x)
    if t is tuple or t is list:
        for y in x:
            _leaves_into(y, out)
    elif t is dict:
        for y in x.values():
            _leaves_into(y, out)
    elif t in _pytree.SUPPORTED_NODES or isinstance(x, tuple):
        out.extend(_pytree.tree_leaves(x))  # namedtuples, return types, OrderedDict, ...
    else:
        out.append(x)


# -- functional collectives -----------------------------------------------------------------------
def all_to_all_single(x: torch.Tensor, out_splits: Sequence[int] | None,
                      in_splits: Sequence[int] | None, group: dist.ProcessGroup) -> torch.Tensor:
    """One functional all-to-all (autograd-free; wait on the result)."""
    return _funcol.all_to_all_single(x, out_splits, in_splits, group)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A functional all-reduce (sum) over ``group``, waited on."""
    return wait(_funcol.all_reduce(x, "sum", group))


def all_gather_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """A functional all-gather of 1-D ``x`` (rank ``r``'s block in row ``r`` of the
    result, flattened), waited on; ``group`` as funcol takes it, e.g. ``(mesh, dim)``."""
    return wait(_funcol.all_gather_single(x, 0, group))


def reduce_scatter_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """A functional reduce-scatter (sum) of 1-D ``x``: this rank's block of the sum,
    waited on."""
    return wait(_funcol.reduce_scatter_single(x, "sum", 0, group))


def dtensor_of(local: torch.Tensor, mesh: Any, placements: Sequence[Placement],
               shape: Sequence[int], stride: Sequence[int]) -> Any:
    """A DTensor over ``local`` with this global shape and stride, built directly (no
    ``from_local`` autograd node or checks: for values made without a graph, e.g. FSDP's
    gathered parameters and reduce-scattered gradients)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(mesh, tuple(placements),
                       tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), local.dtype))
    return DTensor(local, spec, requires_grad=False)


def all_reduce_async(x: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    """A functional all-reduce of ``x`` in place (no copy of the buffer, as DDP reduces
    its buckets), issued and not waited on: ``wait(x)`` before reading ``x``."""
    name = _funcol._resolve_group_name(group)
    return torch.ops._c10d_functional.all_reduce_(x, op.lower(), name)


def at_backward_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the running backward pass has finished its last node
    (called from inside backward, e.g. from a gradient hook; what DDP and FSDP use)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def storage_shared(t: torch.Tensor) -> bool:
    """Whether another tensor (a view, an alias, a ``.grad``) shares ``t``'s storage."""
    # the storage's count of tensor references: ``t`` and the storage object made here
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2


def local_block(t: Any) -> torch.Tensor:
    """A DTensor's local block, without ``to_local``'s autograd node (for gradients)."""
    return t._local_tensor


def dtensor_like(local: torch.Tensor, like: Any) -> Any:
    """A DTensor with ``like``'s mesh, placements, shape and stride over ``local``, built
    without ``from_local``'s autograd node and spec checks (what FSDP2 does for its
    gradients); ``local`` must be the block ``like``'s spec describes."""
    from torch.distributed.tensor import DTensor

    return DTensor(local, like._spec, requires_grad=False)


def is_wrapper_subclass(t: type) -> bool:
    """A tensor subclass that unwraps itself in dispatch (DTensor, a functional
    collective's not-yet-waited result)."""
    from torch.distributed.tensor import DTensor

    return issubclass(t, (DTensor, _funcol.AsyncCollectiveTensor))


def wait(t: torch.Tensor) -> torch.Tensor:
    """Wait for a functional collective's result."""
    return _funcol.wait_tensor(t)


# -- simulate mode: every rank in this process ---------------------------------------------------
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


def rank_map(value_of: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
    """In simulate mode, a tensor whose simulated rank ``r`` holds ``value_of(r)`` (a
    LocalTensor); None outside simulate mode."""
    lm = enabled_local_tensor_mode()
    return None if lm is None else lm.rank_map(value_of)


def own_copy_per_rank(t: torch.Tensor) -> torch.Tensor:
    """In simulate mode, a plain tensor shared by all ranks becomes one copy per rank
    (a LocalTensor), so in-place updates (the optimizer) stay rank-local."""
    lm = enabled_local_tensor_mode()
    if lm is None or isinstance(t, LocalTensor):
        return t
    return lm.rank_map(lambda r: t.detach().clone())


def simulated_rng_states() -> dict[int, tuple] | None:
    """Each simulated rank's generator state (CPU, {device: state}), which LocalTensorMode
    keeps per rank; None outside simulate mode."""
    lm = enabled_local_tensor_mode()
    if lm is None:
        return None
    with host_values():  # plain copies, not one per simulated rank
        return {r: (cpu.clone(), {d: s.clone() for d, s in dev.items()})
                for r, (cpu, dev) in lm._per_rank_rng_states.items()}


def set_simulated_rng_states(states: dict[int, tuple]) -> None:
    """Give each simulated rank back the generator state simulated_rng_states() read."""
    lm = enabled_local_tensor_mode()
    if lm is None:
        return
    with host_values():
        for r, (cpu, dev) in states.items():
            if int(r) in lm.ranks:  # (a checkpoint of a larger world has more)
                lm._per_rank_rng_states[int(r)] = (
                    cpu.clone(), {int(d): s.clone() for d, s in dev.items()})


def host_values() -> contextlib.AbstractContextManager:
    """Suspend simulate mode's LocalTensorMode: plain tensors made here are ordinary,
    the same on every rank (data batches must not be drawn per simulated rank)."""
    return maybe_disable_local_tensor_mode()


def per_rank(func: Callable[..., object]) -> Callable[..., object]:
    """Run a side-effect-free, rank-dependent function once per simulated rank (simulate
    mode) or once (dry and run modes); results combine into per-rank values."""
    return maybe_run_for_local_tensor(func)


def rank_index(sub: Any) -> torch.Tensor:
    """This rank's index in a one-dimensional device mesh, as a 0-d tensor (one value
    per simulated rank in simulate mode)."""
    return per_rank(lambda r: torch.tensor(int(r)))(sub.get_local_rank())  # type: ignore[return-value]


# -- process groups --------------------------------------------------------------------------------
def forget_dtensor_caches() -> None:
    """Drop DTensor's sharding-propagation caches. Their keys compare meshes by shape and
    names only, so after a process group is torn down and another made (one session
    after another in one process) a cached spec could still name the old groups."""
    _clear_sharding_prop_cache()


def init_fake(rank: int, world: int) -> None:
    """A process group that issues no communication (dry and simulate modes)."""
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)


def default_store() -> dist.Store:
    """The default process group's key-value store (run mode's rendezvous store)."""
    return _get_default_store()


def group_ranks(group_name: str) -> list[int]:
    """The global ranks of a process group, from its name."""
    return dist.get_process_group_ranks(_resolve_process_group(group_name))


# -- module tracking ---------------------------------------------------------------------------
def module_tracker() -> ModTracker:
    """A tracker of the modules running now, forward and backward (``.parents``)."""
    return ModTracker()


def tracker_snapshot(tracker: ModTracker) -> Callable[[], None]:
    """Remember which modules ``tracker`` sees running; the returned function restores
    that (after a forward was left early by an exception, as a pipeline chunk is)."""
    parents = set(tracker.parents)
    counts = dict(tracker._active_module_cnt)

    def restore() -> None:
        tracker.parents = set(parents)
        tracker._active_module_cnt = dict(counts)
    return restore


# -- pipelining ---------------------------------------------------------------------------------
def interleaved_order(pp: int, virtual: int, microbatches: int,
                      rank: int) -> list[tuple[int, str, int]]:
    """``ScheduleInterleaved1F1B``'s action order (with its sends and receives) for one
    pipeline rank, as (stage index, action name, microbatch)."""
    return list(_interleaved_orders(pp, virtual, microbatches)[rank])


@functools.lru_cache(maxsize=32)
def _interleaved_orders(pp: int, virtual: int, microbatches: int
                        ) -> tuple[tuple[tuple[int, str, int], ...], ...]:
    """Every pipeline rank's order, built once from stand-in stages (the order depends only
    on the pipeline's sizes; torch lowers every rank's order whichever rank builds it, so
    one build serves all: per rank it cost pp times as much, a minute at pp=32, m=256)."""
    class _Sizes:  # what the schedule reads from its stages to plan the order
        def __init__(self, index: int) -> None:
            self.stage_index, self.num_stages = index, pp * virtual
            self.group_size, self.group_rank = pp, 0
            self.is_first, self.is_last = index == 0, index == pp * virtual - 1

    sched = ScheduleInterleaved1F1B([_Sizes(k * pp) for k in range(virtual)], microbatches)
    return tuple(tuple((a.stage_index, a.computation_type.name, a.microbatch_index or 0)
                       for a in sched.pipeline_order_with_comms[r] if a is not None)
                 for r in range(pp))


def instrument_pipeline_stage(stage: Any, *,
                              on_p2p: Callable[[bool, bool, torch.Tensor, int], None],
                              on_compute: Callable[[bool, int, float, float], None]) -> None:
    """Watch a ``PipelineStage``: ``on_p2p(send, forward, tensor, microbatch)`` for every
    send or receive the schedule asks it for (in that order), and ``on_compute(forward,
    microbatch, t0, t1)`` for every forward or backward it computes."""
    for name, send, fw in (("get_fwd_recv_ops", False, True), ("get_fwd_send_ops", True, True),
                           ("get_bwd_recv_ops", False, False), ("get_bwd_send_ops", True, False)):
        orig = getattr(stage, name)

        def ops(mb: int, *, _orig=orig, _send=send, _fw=fw) -> list:  # noqa: ANN001
            made = _orig(mb)
            for op in made:
                on_p2p(_send, _fw, op.tensor, mb)
            return made
        setattr(stage, name, ops)
    for name, fw in (("forward_one_chunk", True), ("backward_one_chunk", False)):
        orig = getattr(stage, name)

        def timed(mb: int, *args: object, _orig=orig, _fw=fw, **kwargs: object) -> object:  # noqa: ANN001
            t0 = time.time()
            res = _orig(mb, *args, **kwargs)
            on_compute(_fw, mb, t0, time.time())
            return res
        setattr(stage, name, timed)


# -- DTensor strategies the CPU attention kernel lacks --------------------------------------------
_sdpa_registered = False


def _sdpa_patterns(n: int) -> list[list[Placement | None]]:
    return [[Replicate()] * n, [Shard(1)] * n, [Shard(0)] * n]


def register_cpu_sdpa() -> None:
    """Register DTensor sharding strategies for the CPU attention kernel, once.

    ``F.scaled_dot_product_attention`` on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``;
    torch registers DTensor strategies for the CUDA kernels only, so a third-party model
    that calls SDPA directly would fail under any plan on CPU. Attention is independent
    per batch row and per head, so we register what the CUDA flash kernel has:
    everything replicated, heads (dim 1) sharded, or batch (dim 0) sharded.
    """
    global _sdpa_registered
    if _sdpa_registered:
        return
    _sdpa_registered = True
    aten = torch.ops.aten

    @register_op_strategy(aten._scaled_dot_product_flash_attention_for_cpu.default,
                          schema_info=RuntimeSchemaInfo(3))
    def _forward(op_schema: OpSchema) -> OpStrategy:
        # [output, logsumexp, q, k, v]
        mesh = op_schema.get_mesh_from_args()
        return expand_to_full_mesh_op_strategy(mesh, op_schema, _sdpa_patterns(5), input_index=2)

    @register_op_strategy(aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                          schema_info=RuntimeSchemaInfo(6))
    def _backward(op_schema: OpSchema) -> OpStrategy:
        # [grad_q, grad_k, grad_v, grad_out, q, k, v, out, logsumexp]
        mesh = op_schema.get_mesh_from_args(validate=False)
        return expand_to_full_mesh_op_strategy(mesh, op_schema, _sdpa_patterns(9), input_index=3)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``. On meta tensors (dry mode) torch picks the math
    path, which saves the whole score matrix for backward; CPU's and CUDA's fused kernels
    save the output and a log-sum-exp. Run the fused op there (grouped-query and masks
    included), so a dry trace saves what a real run does."""
    if q.device.type == "meta" and dropout_p == 0.0:
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device="meta")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def fused_attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output, fp32 log-sum-exp of each query's scores) of one attention block by the
    fused CPU kernel (which also serves meta tensors, so a dry trace sees the fused op);
    None on other devices, whose caller computes the block itself."""
    if q.device.type not in ("cpu", "meta"):
        return None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale)
    return out, lse


def fused_attention_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                                   causal: bool, scale: float
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The fused kernel's gradients of one block given the *whole* attention's output and
    log-sum-exp (so blocks of a ring add up to the gradient of the whole); None off CPU."""
    if q.device.type not in ("cpu", "meta"):
        return None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return dq, dk, dv


#: fused attention kernels (op_cost counts their FLOPs apart: they run at their own speed)
CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
ATTENTION_OPS = frozenset({CPU_FLASH, CPU_FLASH_BACKWARD, *(
    op.default for op in (torch.ops.aten._scaled_dot_product_flash_attention,
                          torch.ops.aten._scaled_dot_product_flash_attention_backward,
                          torch.ops.aten._scaled_dot_product_efficient_attention,
                          torch.ops.aten._scaled_dot_product_efficient_attention_backward))})


def quiet_dtensor_warnings() -> None:
    """DTensor's advice to flatten mesh dims for a 2-D all-reduce is noise for our users."""
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


# -- storage: FSDP frees a gathered parameter after forward and refills it in backward --------
def _storage_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors whose storage holds ``t``'s values (one per simulated rank)."""
    inner = t._local_tensor if hasattr(t, "_local_tensor") else t  # a DTensor's local block
    if isinstance(inner, LocalTensor):
        return list(inner._local_tensors.values())
    return [inner]


def free_storage(t: torch.Tensor) -> None:
    """Release ``t``'s memory (its storage shrinks to 0 bytes; autograd's saved views of it
    keep their metadata). Meta tensors hold no memory: nothing to do."""
    for x in _storage_tensors(t):
        if x.device.type != "meta":
            x.untyped_storage().resize_(0)


def refill_storage(t: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``t`` back its memory and copy ``values`` (the same layout) into it."""
    with maybe_disable_local_tensor_mode(), torch.no_grad():
        for x, v in zip(_storage_tensors(t), _storage_tensors(values)):
            if x.device.type == "meta":
                continue
            extent = x.storage_offset() + 1 + sum((n - 1) * st for n, st in
                                                  zip(x.shape, x.stride()) if n > 0)
            x.untyped_storage().resize_(extent * x.element_size() if x.numel() else 0)
            # the same values as before the free, so autograd must not see an in-place
            # change (``.data`` has its own version counter): a view made of it inside a
            # custom Function (DTensor's to_local) would otherwise refuse its backward
            x.data.copy_(v)


def storage_freed(t: torch.Tensor) -> bool:
    return any(x.device.type != "meta" and x.untyped_storage().nbytes() == 0
               for x in _storage_tensors(t))


def storage_blocks(t: torch.Tensor) -> list[tuple[int, int, torch.UntypedStorage]]:
    """(simulated rank, identity, storage) of each block of memory holding ``t``'s values:
    one per rank in simulate mode, else one (rank 0: this process's). Views of one tensor
    share an identity; meta tensors have storages (of the size they would need) too."""
    inner = t._local_tensor if hasattr(t, "_local_tensor") else t
    if isinstance(inner, LocalTensor):
        return [(r, x.untyped_storage()._cdata, x.untyped_storage())
                for r, x in inner._local_tensors.items()]
    return [(0, inner.untyped_storage()._cdata, inner.untyped_storage())]


# -- a user's own loop ------------------------------------------------------------------------
@contextlib.contextmanager
def dtensor_op_handlers(*, item: Callable[[Any], object]) -> Iterator[None]:
    """While active, ``.item()`` (and ``float()``) of a DTensor calls ``item(dtensor)``:
    DTensor would return this rank's local value, a partial sum where the tensor is
    ``Partial``."""
    from torch.distributed.tensor import DTensor

    handlers = DTensor._op_dispatcher._custom_op_handlers
    op = torch.ops.aten._local_scalar_dense.default
    before = handlers.get(op)
    handlers[op] = lambda op_call, args, kwargs: item(args[0])
    try:
        yield
    finally:
        if before is None:
            handlers.pop(op, None)
        else:
            handlers[op] = before


@contextlib.contextmanager
def optimizer_step_hooks(*, before: Callable[[], object], after: Callable[[], object]
                         ) -> Iterator[None]:
    """Call ``before``/``after`` around every optimizer's ``step()`` in this process."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: before())
    post = register_optimizer_step_post_hook(lambda opt, args, kwargs: after())
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def loss_parallel_active() -> bool:
    """Whether torch's ``loss_parallel`` handlers are installed right now."""
    from torch.distributed.tensor import DTensor

    return torch.ops.aten._log_softmax.default in DTensor._op_dispatcher._custom_op_handlers
