"""The device mesh as pure data: five named mesh axes and their sizes."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from shardlang.errors import ShardingError, closest

__all__ = ["MESH_AXES", "Mesh", "check_mesh_axis"]

#: The five mesh axes in canonical order, outermost first (tp innermost = fastest links).
MESH_AXES: tuple[str, ...] = ("pp", "dp", "ep", "sp", "tp")


def check_mesh_axis(axis: object, *, where: str = "") -> str:
    """Return ``axis`` if it names a mesh axis, else raise a ShardingError listing them."""
    if isinstance(axis, str) and axis in MESH_AXES:
        return axis
    hint = closest(str(axis), MESH_AXES) if isinstance(axis, str) else None
    near = f"; did you mean {hint!r}?" if hint else ""
    at = f" in {where}" if where else ""
    raise ShardingError(
        f"unknown mesh axis {axis!r}{at}; the mesh axes are "
        f"{', '.join(repr(a) for a in MESH_AXES)}{near}"
    )


@dataclass(frozen=True, slots=True, init=False)
class Mesh:
    """A logical device mesh: a size for each of ``pp, dp, ep, sp, tp`` (default 1).

    The world size is the product of the sizes; ranks are laid out in canonical order
    ``pp, dp, ep, sp, tp`` (row-major, tp fastest).

    Example:
        >>> import shardlang as sl
        >>> m = sl.Mesh(dp=2, tp=2)
        >>> m, m.size, m.shape
        (Mesh(dp=2, tp=2), 4, {'dp': 2, 'tp': 2})
        >>> sl.Mesh.parse("tp=2,dp=2") == m
        True
    """

    pp: int = 1
    dp: int = 1
    ep: int = 1
    sp: int = 1
    tp: int = 1

    def __init__(self, **sizes: int) -> None:
        for name in sizes:
            check_mesh_axis(name, where=f"Mesh({name}=...)")
        for axis in MESH_AXES:
            object.__setattr__(self, axis, sizes.get(axis, 1))
        self.__post_init__()

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            n = getattr(self, axis)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ShardingError(
                    f"mesh axis {axis!r} has size {n!r}; a size must be a positive integer"
                )

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parse ``"dp=2,tp=2"`` (order free; omitted axes have size 1)."""
        sizes: dict[str, int] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not eq or not value.lstrip("+-").isdigit():
                raise ShardingError(
                    f"mesh {text!r}: cannot read {part!r}; write axis=size pairs like 'dp=2,tp=2'"
                )
            if int(value) < 1:
                raise ShardingError(
                    f"mesh {text!r}: mesh axis {name!r} has size {int(value)}; a size must be "
                    f"a positive integer (the number of ranks along {name}), e.g. {name}=2")
            check_mesh_axis(name, where=f"mesh {text!r}")
            if name in sizes:
                raise ShardingError(f"mesh {text!r} names mesh axis {name!r} twice")
            sizes[name] = int(value)
        return cls(**sizes)

    @property
    def size(self) -> int:
        """The world size: the product of all axis sizes."""
        return prod(getattr(self, a) for a in MESH_AXES)

    @property
    def shape(self) -> dict[str, int]:
        """The axes of size > 1 in canonical order, with their sizes."""
        return {a: getattr(self, a) for a in MESH_AXES if getattr(self, a) > 1}

    def axis_size(self, axis: str) -> int:
        """The size of one mesh axis (1 for an axis the mesh does not split)."""
        return getattr(self, check_mesh_axis(axis))

    def coordinate(self, rank: int) -> dict[str, int]:
        """The position of ``rank`` along every mesh axis (canonical row-major order)."""
        if not 0 <= rank < self.size:
            raise ShardingError(f"rank {rank} is outside {self!r} (ranks 0..{self.size - 1})")
        coord: dict[str, int] = {}
        for axis in reversed(MESH_AXES):
            n = getattr(self, axis)
            coord[axis] = rank % n
            rank //= n
        return {a: coord[a] for a in MESH_AXES}

    def rank_of(self, coord: dict[str, int]) -> int:
        """The rank at a coordinate (inverse of :meth:`coordinate`)."""
        rank = 0
        for axis in MESH_AXES:
            rank = rank * getattr(self, axis) + coord.get(axis, 0)
        return rank

    def group(self, rank: int, axis: str) -> tuple[int, ...]:
        """The ranks that share every coordinate with ``rank`` except along ``axis``."""
        coord = self.coordinate(rank)
        return tuple(self.rank_of({**coord, axis: i}) for i in range(self.axis_size(axis)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{a}={n}" for a, n in self.shape.items())
        return f"Mesh({inner})"

    def __str__(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.shape.items()) or "single device"
