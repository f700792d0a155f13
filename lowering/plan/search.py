"""The layout search's pure half: enumerate every layout of ``world`` ranks, prune by
divisibility, and estimate each one's memory and step time from formulas (no trace).

``shardlang plan`` (:mod:`lowering.search`) ranks every candidate by :func:`estimate`,
then traces the best ones in dry mode and ranks those by the traced prediction, the one
``explain --device`` prints. The estimate only decides which layouts are worth a trace:

* compute: one single-device trace of one row (:class:`ModelProfile`), times the rows a
  rank runs, split evenly over the ranks of a pipeline stage (tp, sp and ep split the
  work of the rows dp gives them); under a pipeline the layers split evenly over the
  stages and the head (``2 * seq * vocab * width`` FLOPs per row forward) stays on the
  last, the busiest; under bf16 each forward (each microbatch's) casts the rank's fp32
  weights (6 bytes per parameter moved); the optimizer over the rank's share.
* collectives, per layer and microbatch: tp two all-reduces of the hidden state forward
  and two backward (Megatron); sp ``sp - 1`` permutes of K and V each way; ep two
  all-to-alls of the routed tokens each way; dp the gradient all-reduce in 25 MiB buckets,
  or FSDP's all-gather (twice, per parameter and microbatch) and reduce-scatter of the
  parameters; pp a send of the hidden state per microbatch and boundary, and the sum over
  pp of the gradients of what every stage holds (embeddings, final norm, head).
* memory: parameters, gradients and AdamW state of the rank's share, the single-device
  trace's activations per row times the rows a stage holds in flight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import shardlang as sl
from lowering.plan.buckets import BUCKET_BYTES
from lowering.plan.devices import Device
from lowering.plan.pipeline import Pipe, Schedule
from lowering.plan.time import Item, Predicted, collective_seconds, predict_items
from lowering.schedule.records import Cost, Op, Phase, Record

__all__ = ["ModelProfile", "Candidate", "candidates", "estimate", "divisors_of"]


@dataclass(frozen=True)
class ModelProfile:
    """What the estimate needs to know of a model, from one single-device dry trace."""

    params: int             # parameters (numel; tied ones once)
    outside_params: int     # of which outside the layer stack (every pipeline stage's)
    tensors: int            # parameter tensors (FSDP gathers each one)
    outside_tensors: int    # of which outside the layer stack
    head_numel: int         # the largest parameter outside the stack (the vocab projection)
    expert_params: int      # of which in experts (split over ep)
    experts: int            # experts per MoE layer (0: dense)
    layers: int             # the layer stack's length
    hidden: int             # the residual stream's width
    heads: int              # attention heads (0: unknown)
    batch: int              # global batch rows per step
    seq: int
    forward: Cost           # one row's forward on one device
    backward: Cost
    optimizer: Cost         # one optimizer step over every parameter
    activations: int        # bytes saved for backward by one row's forward
    compute_bytes: int      # bytes per element of the compute dtype (bf16: 2)
    #: one row's forward through the layer stack (what full recompute runs again)
    stack_forward: Cost = Cost()
    stack_saved: int = 0    # bytes of ``activations`` saved inside the stack's layers
    stack_inputs: int = 0   # bytes of the layers' inputs (what full recompute keeps)
    layer_saved: int = 0    # the most one layer saves
    norm_seq: bool = False  # whether activations carry the logical axis ``norm_seq``


@dataclass(frozen=True)
class Candidate:
    mesh: sl.Mesh
    fsdp: bool = False
    microbatches: int = 1
    schedule: str = "none"     # none (pp = 1), 1f1b, interleaved
    virtual: int = 1
    recompute: str = "none"
    #: rules on top of the search's (``--rules`` syntax): ``norm_seq=...+tp`` is Megatron's
    #: sequence parallelism, the norms' and the pipeline boundary's sequence split over tp
    rules: str = ""

    def options(self) -> dict[str, object]:
        """Layout keywords (``Layout.of(model, mesh, **options)``)."""
        out: dict[str, object] = {"fsdp": self.fsdp, "recompute": self.recompute}
        if self.mesh.pp > 1:
            out |= {"microbatches": self.microbatches, "schedule": self.schedule}
            if self.schedule == "interleaved":
                out["virtual"] = self.virtual
        return out

    @property
    def pipe(self) -> Pipe | None:
        if self.mesh.pp == 1:
            return None
        return Pipe(Schedule.parse(self.schedule), self.mesh.pp, self.microbatches,
                    self.virtual)

    def label(self) -> str:
        mesh = ",".join(f"{a}={n}" for a, n in self.mesh.shape.items()) or "dp=1"
        extra = [*(["fsdp"] if self.fsdp else []), *([f"rules {self.rules}"] if self.rules else []),
                 *([f"recompute {self.recompute}"] if self.recompute != "none" else []),
                 *([f"{self.schedule} m={self.microbatches}"
                    + (f" v={self.virtual}" if self.virtual > 1 else "")]
                   if self.mesh.pp > 1 else [])]
        return mesh + (f" ({', '.join(extra)})" if extra else "")


def divisors_of(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world: int, prof: ModelProfile, *, gpus_per_node: int,
               seq_tp: str = "") -> tuple[list[Candidate], dict[str, int]]:
    """Every layout of ``world`` ranks the model's shapes allow, and why others were
    dropped (reason -> how many). ``seq_tp``: the rule that adds tp to ``norm_seq``
    (sequence parallelism); each layout with tp > 1 is then tried with it too."""
    out: list[Candidate] = []
    dropped: dict[str, int] = {}

    def drop(why: str) -> None:
        dropped[why] = dropped.get(why, 0) + 1

    for pp in divisors_of(world):
        if pp > prof.layers:
            drop(f"pp > the {prof.layers} layers")
            continue
        for tp in divisors_of(world // pp):
            if tp > gpus_per_node:
                drop(f"tp > {gpus_per_node} GPUs per node")
                continue
            if prof.heads and prof.heads % tp:
                drop(f"tp does not divide the {prof.heads} heads")
                continue
            for sp in divisors_of(world // (pp * tp)):
                if prof.seq % sp:
                    drop(f"sp does not divide seq {prof.seq}")
                    continue
                for ep in divisors_of(world // (pp * tp * sp)):
                    if ep > 1 and (not prof.experts or prof.experts % ep):
                        drop("ep does not divide the experts" if prof.experts else
                             "ep > 1 on a dense model")
                        continue
                    dp = world // (pp * tp * sp * ep)
                    if prof.batch % (dp * ep):
                        drop(f"dp x ep does not divide the global batch {prof.batch}")
                        continue
                    mesh = sl.Mesh(pp=pp, dp=dp, tp=tp, sp=sp, ep=ep)
                    # (the pipeline boundary carries norm_seq on every model)
                    seq_rules = [""] + ([seq_tp] if seq_tp and tp > 1 and prof.seq % (sp * tp) == 0
                                        and (prof.norm_seq or pp > 1) else [])
                    for fsdp in ((False, True) if dp > 1 else (False,)):
                        pipes = _pipelines(mesh, fsdp, prof, drop)
                        out += [dataclasses.replace(c, rules=r) for r in seq_rules for c in pipes]
    return out, dropped


def _pipelines(mesh: sl.Mesh, fsdp: bool, prof: ModelProfile, drop) -> list[Candidate]:  # noqa: ANN001
    if mesh.pp == 1:
        return [Candidate(mesh, fsdp)]
    rows = prof.batch // (mesh.dp * mesh.ep)
    out = []
    for k in (1, 2, 4, 8):
        m = mesh.pp * k
        if rows % m:
            drop("the microbatches do not divide a rank's rows")
            continue
        out.append(Candidate(mesh, fsdp, m, "1f1b"))
        out += [Candidate(mesh, fsdp, m, "interleaved", v) for v in _virtuals(mesh.pp, prof.layers)]
    return out


def _virtuals(pp: int, layers: int) -> list[int]:
    """Chunks per pipeline rank worth a try: 2, 4, 8, ... while every chunk holds a layer,
    and the one count that gives every layer its own chunk with the embedding and the head
    each alone at the two ends (``pp * v == layers + 2``, the Llama 3 paper's pipeline)."""
    out = [v for v in (2, 4, 8, 16) if pp * v <= layers]
    if (layers + 2) % pp == 0 and (v := (layers + 2) // pp) >= 2 and v not in out:
        out.append(v)
    return out


def _record(op: Op, axis: str, nbytes: float, n: int, phase: Phase, site: str = "") -> Record:
    return Record(index=0, phase=phase, site=site, op=op, axis=axis, shape=(), dtype="",
                  bytes=int(nbytes), group_size=n)


def estimate(c: Candidate, prof: ModelProfile, dev: Device, *, precision: str,
             gpus_per_node: int | None = None) -> tuple[Predicted, int]:
    """(predicted step, peak bytes of the busiest rank), from formulas."""
    mesh, pipe = c.mesh, c.pipe
    pp, m, v = mesh.pp, c.microbatches if pipe else 1, c.virtual if pipe else 1
    world = mesh.size
    rows = prof.batch / (mesh.dp * mesh.ep)          # a data-parallel rank's rows per step
    mb_tokens = rows / m * prof.seq / mesh.sp          # one microbatch's tokens on a rank
    layers = prof.layers / pp
    share = (prof.batch / world) / m / v                 # rows' work per rank and action
    # the head (a vocab x width matmul per token) runs on the last stage only: the
    # busiest pipeline rank holds its layers and the head
    head_f = Cost(flops=2 * prof.seq * prof.head_numel) if pipe else Cost()
    # the profile's forward includes one bf16 cast of every weight: per row it is not
    cast = Cost(bytes=6 * prof.params) if precision == "bf16" else Cost()
    f = (prof.forward - head_f - cast).scaled(share)
    b = (prof.backward - head_f.scaled(2)).scaled(share)
    head = (head_f.scaled(share * v), head_f.scaled(2 * share * v))
    dense = prof.params - prof.expert_params
    held = dense / (mesh.tp * pp) + prof.expert_params / (mesh.tp * pp * mesh.ep)
    if c.fsdp:
        held /= mesh.dp
    opt = prof.optimizer.scaled(held / max(1, prof.params))
    if precision == "bf16":  # the fp32 master weights cast to bf16 at use, every forward
        f = f + Cost(bytes=6 * held / v)
    chunks = pipe.chunks_of(0) if pipe else [0]
    compute = {("O", 0): opt} | {(k, ch): x for ch in chunks for k, x in (("F", f), ("B", b))}
    if pipe:
        compute[("F", 0)], compute[("B", 0)] = f + head[0], b + head[1]
    recompute = c.recompute == "full"
    if recompute:  # each layer's forward again in the backward
        compute |= {("R", ch): prof.stack_forward.scaled(share) for ch in chunks}
    hidden_bytes = mb_tokens * prof.hidden * prof.compute_bytes

    def t(op: Op, axis: str, nbytes: float, n: int) -> float:
        return collective_seconds(_record(op, axis, nbytes, n, Phase.FORWARD), mesh, dev,
                                  gpus_per_node)

    items: list[Item] = []
    per = layers * m  # layer-microbatches a rank runs
    # forward, backward, and under full recompute the forward's again in the backward
    for phase in (Phase.FORWARD, Phase.BACKWARD, *((Phase.BACKWARD,) if recompute else ())):
        if mesh.tp > 1:
            items.append(("critical", phase, "tp", 2 * per * t(Op.ALL_REDUCE, "tp", hidden_bytes, mesh.tp), 1))
        if mesh.sp > 1:
            kv = 2 * hidden_bytes / mesh.tp
            items.append(("critical", phase, "sp", per * (mesh.sp - 1) * t(Op.PERMUTE, "sp", kv, mesh.sp), 1))
        if mesh.ep > 1:
            items.append(("critical", phase, "ep", 2 * per * t(Op.ALL_TO_ALL, "ep", hidden_bytes, mesh.ep), 1))
    grad_bytes = 4 * (dense / (mesh.tp * pp))
    if mesh.dp > 1 and c.fsdp:  # per parameter: gather forward and backward, reduce-scatter
        full = prof.compute_bytes * held * mesh.dp
        n = max(1, round(prof.tensors / pp)) * (m if pipe else 1)
        tg = t(Op.ALL_GATHER, "dp", full / n * (m if pipe else 1), mesh.dp)
        for phase in (Phase.FORWARD, Phase.BACKWARD):
            items.append(("gather", phase, "dp", tg, n))
        n_rs = max(1, round(prof.tensors / pp))
        items.append(("grad", Phase.BACKWARD, "dp",
                      t(Op.REDUCE_SCATTER, "dp", 4 * held * mesh.dp / n_rs, mesh.dp), n_rs))
    elif mesh.dp * mesh.ep * mesh.sp > 1:
        n = mesh.dp * mesh.ep * mesh.sp
        # DDP buckets; under a pipeline one all-reduce per parameter after the last backward
        buckets = (max(1, round(prof.tensors / pp)) if pipe else
                   max(1, math.ceil(grad_bytes / BUCKET_BYTES)))
        items.append(("grad", Phase.BACKWARD, "dp",
                      t(Op.ALL_REDUCE, "dp", grad_bytes / buckets, n), buckets))
    # the boundary's sequence split over tp under sequence parallelism
    hop = t(Op.SEND, "pp", hidden_bytes / (mesh.tp if c.rules else 1), pp) if pipe else 0.0
    if pipe:
        items.append(("p2p", Phase.FORWARD, "pp", 2 * m * v * hop, 1))
        # embeddings, final norm, head: their gradients summed over pp, one by one
        k = max(1, prof.outside_tensors)
        shared = 4 * prof.outside_params / mesh.tp / k
        items.append(("after", Phase.BACKWARD, "pp", t(Op.ALL_REDUCE, "pp", shared, pp), k))
    pred = predict_items(dev, precision=precision, compute={0: compute}, items={0: items},
                         pipe=pipe,
                         tokens=prof.batch * prof.seq, hop=hop, closed_form=True)
    inflight = m if c.schedule == "gpipe" else min(m, pp) * (1 + (v - 1) / v) if pipe else 1
    held_row = prof.activations
    if recompute:  # the layers' inputs instead of their saves, and one layer's while it runs
        held_row = prof.activations - prof.stack_saved + prof.stack_inputs
    acts = held_row * (rows / m) * inflight / pp / (mesh.tp * mesh.sp)
    if recompute:
        acts += prof.layer_saved * (rows / m) / (mesh.tp * mesh.sp)
    state = 4 * held * (1 + 1 + 2)
    return pred, int(state + acts)
