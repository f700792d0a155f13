"""Rules: the map from logical axes (names in model code) to mesh axes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shardlang.errors import ShardingError, closest, divisors
from shardlang.mesh import Mesh, check_mesh_axis
from shardlang.spec import P, SpecEntry

__all__ = ["LOGICAL_AXES", "Rules", "Axes", "check_divisible"]

#: The standard vocabulary of logical axes. Models may use other names too.
LOGICAL_AXES: tuple[str, ...] = (
    "batch", "seq", "embed", "heads", "mlp", "vocab", "experts", "layers",
    # the sequence dim in the residual stream and norms; "seq" is the attention and MLP
    # inputs. Separate names make Megatron-style sequence parallelism a rules choice.
    "norm_seq",
)

#: A tensor's logical axes: one name (or None) per dim.
Axes = tuple[str | None, ...]


def _entry(value: object, name: str) -> SpecEntry:
    where = f"rule {name}={value!r}"
    if value is None:
        return None
    if isinstance(value, str):
        return check_mesh_axis(value, where=where)
    if isinstance(value, (tuple, list)):
        axes = tuple(check_mesh_axis(a, where=where) for a in value)
        if len(set(axes)) != len(axes):
            raise ShardingError(f"{where} names a mesh axis twice")
        return None if not axes else axes[0] if len(axes) == 1 else axes
    raise ShardingError(f"{where}: a rule maps to a mesh axis, a tuple of mesh axes, or None")


@dataclass(frozen=True, slots=True, init=False)
class Rules:
    """Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).

    Changing the parallel layout means changing the mesh and the rules, never the model.
    A logical axis without a rule is replicated.

    Example:
        >>> import shardlang as sl
        >>> r = sl.Rules(batch="dp", mlp="tp")
        >>> r
        Rules(batch='dp', mlp='tp')
        >>> r.spec(("batch", None, "mlp"))
        P('dp', None, 'tp')
    """

    table: tuple[tuple[str, SpecEntry], ...]

    def __init__(self, **rules: object) -> None:
        table = tuple((name, _entry(v, name)) for name, v in rules.items())
        object.__setattr__(self, "table", table)

    @classmethod
    def default(cls) -> Rules:
        """The standard rules: every logical axis on its usual mesh axis.

        ``batch`` shards over (dp, ep): dense layers treat ep as more data parallelism.
        Megatron-style sequence parallelism adds tp to ``norm_seq``
        (``Rules.parse("norm_seq=sp+tp", base=Rules.default())``).
        """
        return cls(batch=("dp", "ep"), seq="sp", norm_seq="sp", heads="tp", mlp="tp",
                   vocab="tp", experts="ep", layers="pp")

    @classmethod
    def parse(cls, text: str, *, base: Rules | None = None) -> Rules:
        """Parse ``"batch=dp,heads=tp,seq=none,batch=dp+ep"`` on top of ``base``.

        ``+`` joins mesh axes into a tuple; ``none`` (or empty) replicates.
        """
        rules: dict[str, SpecEntry] = dict(base.table) if base else {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise ShardingError(
                    f"rules {text!r}: cannot read {part!r}; write logical=mesh pairs "
                    "like 'batch=dp,heads=tp' ('+' joins axes, 'none' replicates)"
                )
            value = value.strip()
            axes = tuple(a.strip() for a in value.split("+") if a.strip())
            rules[name.strip()] = None if value.lower() in ("", "none") else axes
        return cls(**rules)

    def as_dict(self) -> dict[str, SpecEntry]:
        return dict(self.table)

    def mesh_entry(self, logical: str | None) -> SpecEntry:
        """The mesh axis (or axes) for one logical axis; None when it has no rule."""
        if logical is None:
            return None
        return dict(self.table).get(logical)

    def spec(self, axes: Axes, *, where: str = "") -> P:
        """The spec for a tensor whose dims carry these logical axes."""
        return P(*(self.mesh_entry(a) for a in axes), where=where)

    def check_names(self, used: Iterable[str]) -> None:
        """Reject rules for names neither used by the model nor in the standard vocabulary."""
        known = set(used) | set(LOGICAL_AXES)
        for name, _ in self.table:
            if name not in known:
                hint = closest(name, known)
                near = f"; did you mean {hint!r}?" if hint else ""
                raise ShardingError(
                    f"rule {name}=... names logical axis {name!r}, which the model does not "
                    f"use and which is not a standard logical axis "
                    f"({', '.join(LOGICAL_AXES)}){near}"
                )

    def __repr__(self) -> str:
        return "Rules(" + ", ".join(f"{k}={v!r}" for k, v in self.table) + ")"


def check_divisible(shape: Iterable[int], axes: Axes, spec: P, mesh: Mesh, *,
                    where: str, even: Mapping[int, int] | None = None) -> None:
    """Every mesh axis sharding a dim must divide it (product of axes for a tuple).

    ``even`` maps a dim to an extra factor its size must also divide (e.g. 2 for
    load-balanced sequence chunks).
    """
    for dim, size in enumerate(shape):
        mesh_axes = tuple(a for a in spec.axes_of(dim) if mesh.axis_size(a) > 1)
        n = 1
        for a in mesh_axes:
            n *= mesh.axis_size(a)
        extra = (even or {}).get(dim, 1)
        n *= extra
        if n > 1 and size % n:
            name = axes[dim] if dim < len(axes) and axes[dim] else f"dim {dim}"
            label = " x ".join(f"{a}" for a in mesh_axes)
            # the mesh sizes k with k * extra dividing the dim
            sizes = ", ".join(str(d) for d in divisors(size // extra)) if size % extra == 0 \
                else "none: the dim is not a multiple of " + str(extra)
            raise ShardingError(
                f"mesh axis {label!r} (size {n}) must divide logical axis {name!r} "
                f"(size {size}) of {where}; choose {label} in {{{sizes}}}"
            )

