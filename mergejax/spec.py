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

import numpy as np

from mergejax import tree


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
        {g: tuple(_canonical(AxisRef(tuple(r[0]), int(r[1]), *r[2:])) for r in refs)
         for g, refs in self.groups.items()},
    )
    object.__setattr__(self, "sizes", dict(self.sizes))

  def to_json(self) -> dict[str, Any]:
    """`{"groups": {name: [[path, axis, factor], ...]}, "sizes": {name: n}}`."""
    return {
        "groups": {g: [[list(r.path), r.axis, None if r.factor is None else [list(r.factor[0]), r.factor[1]]]
                       for r in refs] for g, refs in self.groups.items()},
        "sizes": dict(self.sizes),
    }

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "PermutationSpec":
    groups = {
        g: [AxisRef(tuple(path), axis, None if f is None else (tuple(f[0]), f[1])) for path, axis, f in refs]
        for g, refs in data["groups"].items()
    }
    return cls(groups, {g: int(n) for g, n in data["sizes"].items()})


def _canonical(ref: AxisRef) -> AxisRef:
  """The factor as `(outer, n, inner)` without 1s; None when it is the whole axis.

  So `((4, 4, 32), 2)` becomes `((16, 32), 1)` and `((1, 8), 1)` becomes None:
  specs written by hand and traced compare equal.
  """
  if ref.factor is None:
    return ref
  shape, index = tuple(int(d) for d in ref.factor[0]), int(ref.factor[1])
  if not 0 <= index < len(shape):
    raise ValueError(f"{'/'.join(ref.path)} axis {ref.axis}: factor index {index} outside {shape}")
  outer, n, inner = math.prod(shape[:index]), shape[index], math.prod(shape[index + 1:])
  if outer == 1 and inner == 1:
    return AxisRef(ref.path, ref.axis, None)
  view = tuple(d for d in (outer, n, inner) if d != 1)
  return AxisRef(ref.path, ref.axis, (view, 0 if outer == 1 else 1))


def _claim(ref: AxisRef, size: int) -> tuple[int, int, int]:
  """The units `ref` permutes as (outer, n, inner) of its axis of `size`."""
  if ref.factor is None:
    return (1, size, 1)
  view, index = ref.factor
  outer = math.prod(view[:index])
  return (outer, view[index], size // (outer * view[index]))


def check_spec(spec: PermutationSpec, variables: Any) -> None:
  """Raises ValueError unless `spec` fits `variables`.

  Every AxisRef names an existing leaf and axis of the right size (a factored
  one: a view whose product is the axis size and whose component has the
  group's size), and no axis (or component of one) is claimed twice.
  """
  shapes = {path: tuple(getattr(leaf, "shape", ())) for path, leaf in tree.leaves_by_path(variables).items()}
  claims: dict[tuple[tuple[str, ...], int], list[tuple[str, tuple[int, int, int]]]] = {}
  for g, refs in spec.groups.items():
    n = spec.sizes[g]
    for ref in refs:
      where = f"{'/'.join(ref.path)} axis {ref.axis}"
      if ref.path not in shapes:
        raise ValueError(f"group {g!r}: no variable {'/'.join(ref.path)}")
      shape = shapes[ref.path]
      if not 0 <= ref.axis < len(shape):
        raise ValueError(f"group {g!r}: {where} out of range for shape {shape}")
      size = shape[ref.axis]
      if ref.factor is None and size != n:
        raise ValueError(f"{where}: size {size}, group {g!r} has {n}")
      if ref.factor is not None:
        view, index = ref.factor
        if math.prod(view) != size or view[index] != n:
          raise ValueError(f"{where}: factor {ref.factor} does not view size {size} with {n} units of group {g!r}")
      claim = _claim(ref, size)
      for other, seen in claims.get((ref.path, ref.axis), []):
        if not _compatible(claim, seen):
          raise ValueError(f"{where} is claimed by groups {other!r} and {g!r}")
      claims.setdefault((ref.path, ref.axis), []).append((g, claim))


def _compatible(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
  """Two claims on one axis permute disjoint, nested components of it."""
  (oa, na, ia), (ob, nb, ib) = a, b
  if (oa, na, ia) == (ob, nb, ib):
    return False
  # a's block (na * ia) ends where b's component starts, or the reverse.
  return ia == nb * ib or ib == na * ia


def permutation_to_json(perm: Mapping[str, Any]) -> dict[str, list[int]]:
  """`{group: [ints]}`, in the permutation's group order."""
  return {g: [int(i) for i in np.asarray(p)] for g, p in perm.items()}


def permutation_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `permutation_to_json`: `{group: int32[n]}`."""
  return {g: np.asarray(p, np.int32) for g, p in data.items()}


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
