"""The layout options, declared once: keywords of ``lower()``, fields of a ``Layout``, flags
of the CLI.

:class:`Options` is the one declaration. Each field carries its command-line flag and help
text, so the CLI builds its arguments from it; ``lower(model, mesh, rules, **keywords)``
builds one from its keywords; :func:`check_options` validates one against a mesh and
rules. An error names the keyword and the flag both (``microbatches=3 (--microbatches 3)``),
so the Python API and the CLI read the same message.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

import shardlang as sl
from shardlang.errors import Choice, closest, divisors

__all__ = ["Options", "Precision", "Recompute", "Schedule", "check_executed", "option_fields", "given", "check_options"]


class Precision(Choice, what="precision", keyword="precision", flag="--precision"):
    """What compute runs in: ``fp32``, or ``bf16`` (fp32 master parameters and optimizer
    state, bf16 compute and FSDP gathers, fp32 gradient reductions)."""

    FP32 = "fp32"
    BF16 = "bf16"


class Recompute(Choice, what="recompute", keyword="recompute", flag="--recompute"):
    """Activation recompute, as ``explain --device`` and ``plan`` model it: ``none``;
    ``full`` (each layer of the stack keeps only its input and re-runs its forward,
    collectives included, in the backward); ``selective`` (the attention core's
    sequence-squared tensors recomputed, Megatron's: a fused attention kernel, which
    shardlang's traces use, already saves none of them, so it equals ``none``)."""

    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class Schedule(Choice, what="pipeline schedule", keyword="schedule", flag="--schedule"):
    """A pipeline schedule (``torch.distributed.pipelining``'s three)."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"


def _opt(default: object, flag: str, help: str, metavar: str | None = None) -> object:  # noqa: A002
    return field(default=default, metadata={"flag": flag, "help": help, "metavar": metavar})


@dataclass(frozen=True)
class Options:
    """How a model is laid out beyond the mesh and rules (keywords of :func:`lower`).

    ``None`` means "the default for this mesh": the preset's batch and sequence, ``pp``
    microbatches, the 1F1B schedule, 2 virtual stages when interleaved.

    Example:
        >>> from lowering import Options
        >>> Options(fsdp=True, batch=16)
        Options(fsdp=True, batch=16, seq=None, load_balance=False, schedule=None, microbatches=None, virtual=None, precision=<Precision.FP32: 'fp32'>, recompute=<Recompute.NONE: 'none'>, bucket_kb=None)
    """

    fsdp: bool = _opt(False, "--fsdp", "shard parameters over dp (FSDP)")  # type: ignore[assignment]
    batch: int | None = _opt(None, "--batch", "global batch size (default: the preset's, "  # type: ignore[assignment]
                             "else 8; under pp, that many rows per microbatch)")
    seq: int | None = _opt(None, "--seq", "sequence length (default: the preset's, else 32)")  # type: ignore[assignment]
    load_balance: bool = _opt(False, "--load-balance",  # type: ignore[assignment]
                              "load-balanced causal sequence sharding: sp rank r holds chunks "
                              "r and 2*sp-1-r (seq divisible by 2*sp)")
    schedule: Schedule | None = _opt(None, "--schedule", "pipeline schedule (pp > 1; default "  # type: ignore[assignment]
                                     "1f1b)", metavar="{gpipe,1f1b,interleaved}")
    microbatches: int | None = _opt(None, "--microbatches",  # type: ignore[assignment]
                                    "pipeline microbatches per step (pp > 1; default: pp)")
    virtual: int | None = _opt(None, "--virtual-stages", "model chunks per pipeline rank, "  # type: ignore[assignment]
                               "interleaved schedule only (default 2 there, else 1)", metavar="V")
    precision: Precision = _opt(Precision.FP32, "--precision",  # type: ignore[assignment]
                                "fp32, or bf16: fp32 master weights and optimizer state, bf16 "
                                "compute and FSDP gathers, fp32 gradient reductions",
                                metavar="{fp32,bf16}")
    recompute: Recompute = _opt(Recompute.NONE, "--recompute",  # type: ignore[assignment]
                                "activation recompute as explain --device and plan predict "
                                "it: full (each layer keeps its input, re-runs its forward in "
                                "backward), selective (the attention core: what a fused "
                                "kernel does anyway), none; simulate and run do not execute "
                                "it yet", metavar="{none,selective,full}")
    bucket_kb: int | None = _opt(None, "--bucket-kb",  # type: ignore[assignment]
                                 "gradient all-reduce bucket size in KiB (default DDP's: 1024 "
                                 "for the first bucket, 25600 after; 0: one all-reduce per "
                                 "parameter)", metavar="KIB")

    def __post_init__(self) -> None:
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            object.__setattr__(self, "schedule", Schedule.parse(self.schedule))
        if not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", Precision.parse(self.precision))
        if not isinstance(self.recompute, Recompute):
            object.__setattr__(self, "recompute", Recompute.parse(self.recompute))

    @classmethod
    def of(cls, **keywords: object) -> Options:
        """Options from keywords; an unknown keyword is a ShardingError naming the closest."""
        names = [f.name for f in dataclasses.fields(cls)]
        for k in keywords:
            if k not in names:
                hint = closest(k, names)
                near = f"; did you mean {hint!r}?" if hint else ""
                raise sl.ShardingError(
                    f"unknown layout option {k!r}{near}; the options are {', '.join(names)}")
        return cls(**keywords)  # type: ignore[arg-type]

    @property
    def pipeline_schedule(self) -> Schedule:
        """The schedule a pipeline runs (1F1B unless given)."""
        return self.schedule or Schedule.ONE_F_ONE_B


def option_fields() -> list[dataclasses.Field]:
    """The fields of :class:`Options`, each with ``metadata["flag"]`` and ``["help"]``."""
    return list(dataclasses.fields(Options))


def given(name: str, value: object) -> str:
    """How a message names an option the user gave: ``microbatches=3 (--microbatches 3)``."""
    f = next(f for f in dataclasses.fields(Options) if f.name == name)
    shown = value.value if isinstance(value, enum.Enum) else value
    flag = f.metadata["flag"]
    return f"{name}={shown!r} ({flag})" if isinstance(value, bool) else \
        f"{name}={shown!r} ({flag} {shown})"


# -- validation: small checks behind one entry point ---------------------------------------------
def _check_positive(o: Options) -> None:
    for name in ("batch", "seq", "microbatches", "virtual"):
        v = getattr(o, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise sl.ShardingError(f"{given(name, v)}: must be a positive integer")
    v = o.bucket_kb
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise sl.ShardingError(f"{given('bucket_kb', v)}: must be an integer >= 0 (KiB; 0 "
                               "reduces each gradient on its own)")


def _check_pipeline_only(o: Options, mesh: sl.Mesh) -> None:
    if mesh.pp > 1:
        return
    for name in ("microbatches", "virtual", "schedule"):
        v = getattr(o, name)
        if v is not None and not (name in ("microbatches", "virtual") and v == 1):
            raise sl.ShardingError(
                f"{given(name, v)} needs a pipeline, but the mesh {mesh!r} has pp=1; add pp "
                "to the mesh (e.g. pp=2) or drop the option")


def _check_batch(o: Options, mesh: sl.Mesh, rules: sl.Rules) -> None:
    if o.batch is None:
        return
    spec = rules.spec(("batch",), where="the input batch")
    sl.rules.check_divisible((o.batch,), ("batch",), spec, mesh,
                             where=f"the input batch ({given('batch', o.batch)})")


def _check_load_balance(o: Options, mesh: sl.Mesh, rules: sl.Rules) -> None:
    if not o.load_balance:
        return
    seq_axes = [a for a in rules.spec(("seq",), where="the sequence").mesh_axes
                if mesh.axis_size(a) > 1]
    if not seq_axes:
        raise sl.ShardingError(
            f"{given('load_balance', True)} balances a sharded causal sequence, but no mesh "
            f"axis of {mesh!r} shards 'seq' (rules: seq -> "
            f"{rules.mesh_entry('seq')!r}); add sp to the mesh or drop the option")
    if o.seq is not None:
        n = math.prod(mesh.axis_size(a) for a in seq_axes)
        if o.seq % (2 * n):
            ok = [d for d in divisors(o.seq) if o.seq % (2 * d) == 0]
            raise sl.ShardingError(
                f"load-balanced sequence sharding ({given('load_balance', True)}) cuts the "
                f"sequence into 2*{'*'.join(seq_axes)} equal chunks: 2 x {n} (size {2 * n}) "
                f"must divide the sequence (size {o.seq}, {given('seq', o.seq)}); choose "
                f"{'*'.join(seq_axes)} in {{{', '.join(map(str, ok)) or 'none'}}} or a seq "
                f"divisible by {2 * n}")


def check_options(o: Options, mesh: sl.Mesh, rules: sl.Rules) -> None:
    """Every option mistake that needs no model, as a ShardingError (the model-dependent
    ones, layers and shapes, are checked by :func:`lowering.lower`)."""
    if not isinstance(o, Options):
        raise sl.ShardingError(f"options must be lowering.Options, got {type(o).__name__}")
    _check_positive(o)
    _check_pipeline_only(o, mesh)
    _check_batch(o, mesh, rules)
    _check_load_balance(o, mesh, rules)


def check_executed(o: Options, what: str) -> None:
    """Options that only ``explain`` and ``plan`` model: a ShardingError where ``what``
    (a mode, ``parallelize``) would have to execute them."""
    if o.recompute is not Recompute.NONE:
        raise sl.ShardingError(
            f"recompute={o.recompute.value!r} (--recompute {o.recompute.value}) in {what}: "
            "shardlang predicts activation recompute (explain --device, plan) but does not "
            "execute it yet; drop it here (recompute none), or give a smaller batch, more "
            "microbatches, tp or pp to fit")
