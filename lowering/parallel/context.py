"""The lowering context: what ``sl.constrain``, ``sl.attention``, ``sl.shard_map`` and
the collectives do while a model runs under a plan (global view over DTensor)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

import shardlang as sl
from lowering._torch import rank_index, sdpa
from lowering.parallel.collectives import run_collective
from lowering.parallel.fsdp import is_gathered, partial_over
from lowering.parallel.sequence import load_balanced_order, ring_attention
from lowering.parallel.shard_map import VaryingTracker, check_outputs, submesh
from lowering.parallel.tensor import relayout
from lowering.plan import Plan, contiguous_stride, placements
from lowering.schedule import Recorder

__all__ = ["DTensorContext"]

_ATTN_AXES: sl.Axes = ("batch", "heads", "seq", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous, as the DTensor it flows
    back into claims."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return g.contiguous()


class DTensorContext:
    """Implements :class:`shardlang.LoweringContext` over one DTensor device mesh."""

    def __init__(self, plan: Plan, dmesh: DeviceMesh, recorder: Recorder | None = None) -> None:
        self.plan, self.mesh, self.rules = plan, plan.mesh, plan.rules
        self.dmesh, self.recorder = dmesh, recorder
        self.tracker: VaryingTracker | None = None
        self._layouts: dict[tuple, tuple[sl.P, tuple[Placement, ...]]] = {}

    # -- helpers --------------------------------------------------------------
    def site(self) -> str:
        return self.recorder.current_site() if self.recorder else "the model"

    def layout(self, shape: Sequence[int], axes: sl.Axes, what: str) -> tuple[sl.P, tuple[Placement, ...]]:
        key = (tuple(shape), tuple(axes))
        hit = self._layouts.get(key)
        if hit is not None:  # checked before: the same shape and axes divide the same way
            return hit
        where = f"{what} in {self.site()}"
        spec = self.rules.spec(axes, where=where)
        sl.rules.check_divisible(shape, axes, spec, self.mesh, where=where)
        self._layouts[key] = spec, placements(spec, self.mesh)
        return self._layouts[key]

    def _to_layout(self, x: torch.Tensor, pl: tuple[Placement, ...]) -> DTensor:
        if not isinstance(x, DTensor):
            return distribute_tensor(x, self.dmesh, pl, src_data_rank=None)
        return relayout(x, self.dmesh, pl)

    # -- the protocol ---------------------------------------------------------
    def constrain(self, x: torch.Tensor, axes: sl.Axes) -> torch.Tensor:
        if self.tracker is not None:
            raise sl.ShardingError(
                f"sl.constrain inside a shard_map region in {self.site()}: the region works "
                "on local blocks; constrain its inputs or outputs instead (in_axes/out_axes)"
            )
        _, pl = self.layout(x.shape, axes, f"activation {axes}")
        return self._to_layout(x, pl)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  causal: bool, scale: float | None) -> torch.Tensor:
        spec = self._attention_spec(q)
        self._attention_spec(k, "key/value heads of ")
        seq_axes = [a for a in spec.axes_of(2) if self.mesh.axis_size(a) > 1]
        if not seq_axes:  # every (row, head) on its own: local SDPA, no collective
            return self._local_attention(spec, q, k, v, causal=causal, scale=scale)
        axis = seq_axes[0]
        n, balanced = self.mesh.axis_size(axis), self.plan.options.load_balance

        sub = submesh(self.dmesh, axis)

        def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return ring_attention(q, k, v, axis=axis, n=n, causal=causal, scale=scale,
                                  balanced=balanced, sub=sub, recorder=self.recorder)

        return self._shard_map_specs(ring, [spec] * 3, [spec], (q, k, v))

    def _local_attention(self, spec: sl.P, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         *, causal: bool, scale: float | None) -> DTensor:
        """SDPA on each rank's block of rows and heads. Inputs and output share one layout
        over every mesh axis (split alike, or replicated alike), so each rank's block of
        the output is SDPA of its blocks and each gradient is local too: no shard_map
        region and no varying-axis bookkeeping are needed (what ``shard_map`` would do,
        with less per-call work)."""
        if self.tracker is not None:
            raise sl.ShardingError("sl.attention inside a shard_map region: the region works on "
                                   "local blocks; call F.scaled_dot_product_attention there")
        pl = placements(spec, self.mesh)
        # contiguous first: to_local's backward claims the input's global strides for the
        # local gradient, which a transposed input's gradient would not have
        local = [_ContiguousGrad.apply(self._to_layout(t, pl).contiguous().to_local())
                 for t in (q, k, v)]
        out = sdpa(*local, is_causal=causal, scale=scale,
                   enable_gqa=q.shape[1] != k.shape[1]).contiguous()
        shape = torch.Size((*q.shape[:-1], v.shape[-1]))
        return DTensor.from_local(out, self.dmesh, pl, run_check=False, shape=shape,
                                  stride=contiguous_stride(shape))

    def _attention_spec(self, q: torch.Tensor, what: str = "") -> sl.P:
        """(batch, heads, seq, None), with the sequence split over one mesh axis at most
        and never over an axis batch or heads already use (Megatron-SP gathers the
        sequence before attention: heads take tp)."""
        where = f"{what}attention in {self.site()}"
        entries = [self.rules.mesh_entry(a) for a in ("batch", "heads")]
        used = {a for e in entries for a in ((e,) if isinstance(e, str) else (e or ()))}
        seq = self.rules.mesh_entry("seq")
        seq_axes = tuple(a for a in ((seq,) if isinstance(seq, str) else (seq or ()))
                         if a not in used and self.mesh.axis_size(a) > 1)
        if len(seq_axes) > 1:
            raise sl.ShardingError(
                f"{where}: the sequence is split over {seq_axes}; ring attention runs over "
                "one mesh axis: map 'seq' to one of them"
            )
        spec = sl.P(entries[0], entries[1], seq_axes[0] if seq_axes else None, None, where=where)
        even = {2: 2} if seq_axes and self.plan.options.load_balance else None
        sl.rules.check_divisible(q.shape, _ATTN_AXES, spec, self.mesh, where=where, even=even)
        return spec

    def axis_index(self, axis: str) -> torch.Tensor:
        sub = submesh(self.dmesh, axis)
        if sub is None:
            return torch.tensor(0)
        idx = rank_index(sub)
        return idx if self.tracker is None else self.tracker.mark(idx, frozenset({axis}))

    def positions(self, n: int, device: torch.device | str | None) -> torch.Tensor:
        sp = self.mesh.sp
        if self.plan.options.load_balance and sp > 1 and n % (2 * sp) == 0:
            return load_balanced_order(n, sp).to(device)
        return torch.arange(n, device=device)

    def shard_map(self, fn: Callable[..., object], in_axes: Sequence[sl.Axes | None],
                  out_axes: object, args: tuple[object, ...]) -> object:
        name = getattr(fn, "__name__", "fn")
        in_specs: list[sl.P | None] = []
        for i, (a, axes) in enumerate(zip(args, in_axes)):
            if axes is None:
                in_specs.append(None)
                continue
            if not isinstance(a, torch.Tensor) or len(axes) != a.dim():
                raise sl.ShardingError(
                    f"shard_map({name}) argument {i}: in_axes {tuple(axes)} needs a tensor "
                    f"with {len(axes)} dims, got "
                    f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
                )
            in_specs.append(self.layout(a.shape, tuple(axes), f"shard_map({name}) argument {i}")[0])
        single = not (isinstance(out_axes, (tuple, list)) and out_axes
                      and all(isinstance(e, (tuple, list)) for e in out_axes))
        axes_list = [out_axes] if single else list(out_axes)  # type: ignore[arg-type]
        out_specs = [self.rules.spec(tuple(ax), where=f"shard_map({name}) output")  # type: ignore[arg-type]
                     for ax in axes_list]
        return self._shard_map_specs(fn, in_specs, out_specs, args, single=single)

    def _shard_map_specs(self, fn: Callable[..., object], in_specs: Sequence[sl.P | None],
                         out_specs: Sequence[sl.P], args: tuple[object, ...], *,
                         single: bool = True) -> object:
        name = getattr(fn, "__name__", "fn")
        if self.tracker is not None:
            raise sl.ShardingError(f"shard_map({name}) inside another shard_map region")
        tracker = VaryingTracker(self._psum_cotangent)
        local_args: list[object] = []
        # tokens split over dp come in: a gathered parameter's gradient is then a partial
        # sum over dp (with none, nothing varies over dp and it stays replicated)
        rows = any(spec is not None and "dp" in spec.mesh_axes for spec in in_specs)
        for a, spec in zip(args, in_specs):
            if spec is None:
                local_args.append(a)
                continue
            # contiguous first: to_local's backward claims the input's global strides for
            # the local gradient, which a transposed input's gradient would not have
            pl = placements(spec, self.mesh)  # type: ignore[arg-type]
            vma = frozenset(spec.mesh_axes)
            if rows and is_gathered(a) and tuple(a.placements) == tuple(pl):
                # FSDP's gather: its gradient leaves as a partial sum over dp (each rank's
                # tokens' share) for the gather's reduce-scatter, so the region treats it
                # as varying over dp and never psums its cotangent (no relayout either:
                # that would pin the gradient to replicated, an all-reduce)
                t = a.contiguous()
                local = t.to_local(grad_placements=partial_over(t, "dp"))
                vma |= {"dp"}
            else:
                local = self._to_layout(a, pl).contiguous().to_local()
            local = _ContiguousGrad.apply(local)
            local_args.append(tracker.mark(local, vma))
        self.tracker = tracker
        try:
            with tracker:
                out = fn(*local_args)
        finally:
            self.tracker = None
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)  # type: ignore[arg-type]
        if len(outs) != len(out_specs) or not all(isinstance(o, torch.Tensor) for o in outs) or (
                single and not isinstance(out, torch.Tensor)):
            raise sl.ShardingError(
                f"shard_map({name}) returned {len(outs)} value(s) but out_axes describe "
                f"{len(out_specs)}; return tensors, one per out_axes entry"
            )
        result = []
        for o, spec in zip(outs, out_specs):
            if len(spec) != o.dim():
                raise sl.ShardingError(
                    f"shard_map({name}) output of local shape {tuple(o.shape)} has {o.dim()} "
                    f"dims but its out_axes have {len(spec)}"
                )
            shape = [s * math.prod(self.mesh.axis_size(a) for a in spec.axes_of(d))
                     for d, s in enumerate(o.shape)]
            result.append(DTensor.from_local(  # the stride claimed is contiguous: so is o
                o.contiguous(), self.dmesh, placements(spec, self.mesh), run_check=False,
                shape=torch.Size(shape), stride=contiguous_stride(shape)))
        check_outputs(outs, out_specs, tracker, self.mesh.shape, name)
        return result[0] if single else tuple(result)

    def collective(self, comm: sl.Comm, x: torch.Tensor, axis: str, **kw: int) -> torch.Tensor:
        if self.tracker is None:
            raise sl.ShardingError(
                f"sl.{comm.value}(x, {axis!r}) in {self.site()} is outside a shard_map region: "
                "collectives act on local blocks; wrap the code in sl.shard_map"
            )
        return self._collective(comm, x, axis, **kw)

    def _psum_cotangent(self, g: torch.Tensor, axis: str) -> torch.Tensor:
        """The backward of an implicit pvary (runs after the region has ended)."""
        sub = submesh(self.dmesh, axis)
        return g if sub is None else run_collective(sl.Comm.PSUM, g, sub, recorder=self.recorder)

    def _collective(self, comm: sl.Comm, x: torch.Tensor, axis: str, **kw: int) -> torch.Tensor:
        tracker = self.tracker
        sub = submesh(self.dmesh, axis)
        if sub is None or tracker is None:
            return x
        x = tracker.pvary(x, frozenset({axis}))
        with self._paused(tracker):
            out = run_collective(comm, x, sub, recorder=self.recorder, **kw)
        vma = tracker.vma(x)
        invariant = comm in (sl.Comm.PSUM, sl.Comm.ALL_GATHER)
        return tracker.mark(out, vma - {axis} if invariant else vma | {axis})

    @staticmethod
    @contextlib.contextmanager
    def _paused(tracker: VaryingTracker) -> Iterator[None]:
        was, tracker.paused = tracker.paused, True
        try:
            yield
        finally:
            tracker.paused = was
