"""``P``: a PartitionSpec, one entry per tensor dim (JAX semantics)."""

from __future__ import annotations

from dataclasses import dataclass

from shardlang.errors import ShardingError, fmt_spec
from shardlang.mesh import check_mesh_axis

__all__ = ["P", "SpecEntry"]

#: One spec entry: a mesh axis, a tuple of mesh axes (outer first), or None (not sharded).
SpecEntry = str | tuple[str, ...] | None


def _normalise(entry: object, spec: str) -> SpecEntry:
    if entry is None:
        return None
    if isinstance(entry, str):
        return check_mesh_axis(entry, where=spec)
    if isinstance(entry, tuple):
        axes = tuple(check_mesh_axis(a, where=spec) for a in entry)
        if not axes:
            return None
        return axes[0] if len(axes) == 1 else axes
    raise ShardingError(
        f"spec entry {entry!r} in {spec}: each entry must be a mesh axis name, "
        "a tuple of mesh axis names, or None"
    )


@dataclass(frozen=True, slots=True, init=False)
class P:
    """A spec: for each dim of a tensor, the mesh axis (or axes) that shard it.

    A mesh axis may shard only one dim of a tensor. ``None`` means the dim is not
    sharded (replicated over every mesh axis the spec does not name).

    Example:
        >>> import shardlang as sl
        >>> sl.P("dp", None, ("sp", "tp"))
        P('dp', None, ('sp', 'tp'))
        >>> sl.P("dp", None).mesh_axes
        ('dp',)
    """

    entries: tuple[SpecEntry, ...]

    def __init__(self, *entries: object, where: str = "") -> None:
        label = fmt_spec(entries) + (f" for {where}" if where else "")
        normal = tuple(_normalise(e, label) for e in entries)
        object.__setattr__(self, "entries", normal)
        self.__post_init__(where)

    def __post_init__(self, where: str = "") -> None:
        seen: set[str] = set()
        for axis in self.mesh_axes_with_repeats:
            if axis in seen:
                at = f" for {where}" if where else ""
                raise ShardingError(
                    f"spec {self!r}{at} uses mesh axis {axis!r} twice; "
                    "a mesh axis may shard only one dim"
                )
            seen.add(axis)

    @property
    def mesh_axes_with_repeats(self) -> tuple[str, ...]:
        out: list[str] = []
        for e in self.entries:
            out.extend((e,) if isinstance(e, str) else (e or ()))
        return tuple(out)

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        """Every mesh axis the spec uses, in entry order."""
        return self.mesh_axes_with_repeats

    def axes_of(self, dim: int) -> tuple[str, ...]:
        """The mesh axes that shard ``dim`` (empty when it is not sharded)."""
        e = self.entries[dim]
        return (e,) if isinstance(e, str) else (e or ())

    def dim_of(self, axis: str) -> int | None:
        """The dim that mesh axis ``axis`` shards, or None."""
        for d in range(len(self.entries)):
            if axis in self.axes_of(d):
                return d
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return fmt_spec(self.entries)
