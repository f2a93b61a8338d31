"""Permutation specs and merge layouts.

A `PermutationSpec` says which axes of a variables tree share one permutation
(a *group*); a `MergeLayout` says, per group, how a merged model lays out that
axis. Both are plain data: hashable where it matters, JSON round-trippable, and
checked on construction.

The merged axis of a group is laid out `merged | A only | B only`:

    GroupLayout(n_merged, n_a, n_b)   width = n_merged + n_a + n_b

Merging a fraction r of a group of n units (the *merge ratio*; the PLeaS
reference code's `budget_ratio` is 1 - r) gives `n_merged = round_half_up(r n)`
and `n_a = n_b = n - n_merged`: r = 1 is one model's width, r = 0 keeps both
models whole side by side.
"""

from collections.abc import Iterator, Mapping
import dataclasses
import math
from typing import Any, NamedTuple


class AxisRef(NamedTuple):
  """One axis of one variable, as a member of a permutation group.

  Attributes:
    path: the variable's key path, e.g. `("params", "Dense_0", "kernel")`.
    axis: the axis of that variable.
    factor: None, or `(shape, index)`: the axis is viewed as `shape` (row-major,
      e.g. `(heads, head_dim)` or `(h, w, channels)` for a flatten before a Dense
      layer) and the group permutes component `index` of that view.
  """

  path: tuple[str, ...]
  axis: int
  factor: tuple[tuple[int, ...], int] | None = None


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
  """Groups of axes that share one permutation.

  Attributes:
    groups: group name -> the axes it permutes.
    sizes: group name -> the group's size (the permuted dimension).
  """

  groups: Mapping[str, tuple[AxisRef, ...]]
  sizes: Mapping[str, int]

  def __post_init__(self):
    if set(self.groups) != set(self.sizes):
      missing = sorted(set(self.groups) ^ set(self.sizes))
      raise ValueError(f"groups and sizes name different groups: {missing}")
    for name, size in self.sizes.items():
      if not isinstance(size, int) or size < 1:
        raise ValueError(f"group {name!r}: size must be a positive int, got {size!r}")
    object.__setattr__(
        self,
        "groups",
        {g: tuple(AxisRef(tuple(r[0]), int(r[1]), *r[2:]) for r in refs)
         for g, refs in self.groups.items()},
    )


class GroupLayout(NamedTuple):
  """How a merged model lays out one group's axis: `merged | A only | B only`."""

  n_merged: int
  n_a: int
  n_b: int

  @property
  def width(self) -> int:
    """The merged model's size along the group's axis."""
    return self.n_merged + self.n_a + self.n_b


def round_half_up(x: float) -> int:
  """Rounds .5 up, unlike Python's `round` (banker's rounding)."""
  return int(math.floor(x + 0.5))


class MergeLayout(Mapping[str, GroupLayout]):
  """Group name -> `GroupLayout(n_merged, n_a, n_b)`; an immutable mapping.

  The layout of an original model is `identity(sizes)`: every group fully
  "merged" with nothing kept aside, so every width is the original one.
  """

  def __init__(self, groups: Mapping[str, GroupLayout | tuple[int, int, int]]):
    checked = {}
    for name, value in groups.items():
      if len(value) != 3:
        raise ValueError(f"group {name!r}: expected (n_merged, n_a, n_b), got {value!r}")
      g = GroupLayout(*(int(v) for v in value))
      if min(g) < 0 or any(int(v) != v for v in value):
        raise ValueError(f"group {name!r}: counts must be non-negative ints, got {value!r}")
      if g.width == 0:
        raise ValueError(f"group {name!r}: a layout of width 0")
      checked[name] = g
    self._groups = checked

  @classmethod
  def identity(cls, sizes: Mapping[str, int]) -> "MergeLayout":
    """The layout of an original model: `(n, 0, 0)` per group."""
    return cls({g: (n, 0, 0) for g, n in sizes.items()})

  @classmethod
  def from_ratios(
      cls, sizes: Mapping[str, int], ratios: float | Mapping[str, float]
  ) -> "MergeLayout":
    """Merges a fraction r of each group; the rest of both models is kept.

    Args:
      sizes: group name -> original size n.
      ratios: one merge ratio r in [0, 1] for every group, or one per group.
    """
    if not isinstance(ratios, Mapping):
      ratios = {g: ratios for g in sizes}
    unknown = sorted(set(ratios) - set(sizes))
    if unknown:
      raise ValueError(f"ratios name unknown groups: {unknown}")
    out = {}
    for g, n in sizes.items():
      r = ratios.get(g, 1.0)
      if not 0.0 <= r <= 1.0:
        raise ValueError(f"group {g!r}: merge ratio {r} not in [0, 1]")
      m = round_half_up(r * n)
      out[g] = (m, n - m, n - m)
    return cls(out)

  def widths(self) -> dict[str, int]:
    """Group name -> merged width."""
    return {g: v.width for g, v in self._groups.items()}

  def to_json(self) -> dict[str, list[int]]:
    return {g: list(v) for g, v in self._groups.items()}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "MergeLayout":
    return cls({g: tuple(v) for g, v in data.items()})

  def __getitem__(self, name: str) -> GroupLayout:
    return self._groups[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._groups)

  def __len__(self) -> int:
    return len(self._groups)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Mapping):
      return NotImplemented
    return dict(self._groups) == {g: tuple(v) for g, v in other.items()}

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._groups.items())))

  def __repr__(self) -> str:
    body = ", ".join(f"{g!r}: {tuple(v)}" for g, v in self._groups.items())
    return f"MergeLayout({{{body}}})"
