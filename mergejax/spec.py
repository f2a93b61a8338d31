"""Permutation specs and merge layouts.

A `PermutationSpec` says which axes of a variables tree share one permutation
(a *group*); a `MergeLayout` says, per group, how a merged model lays out that
axis. Both are plain data: hashable, JSON round-trippable, and checked on
construction.

    spec = PermutationSpec({"h": [AxisRef(("params", "dense_0", "kernel"), 1),
                                  AxisRef(("params", "dense_1", "kernel"), 0)]},
                           {"h": 64})
    check_spec(spec, variables)        # ValueError naming the path that does not fit
    save_spec("spec.json", spec); load_spec("spec.json") == spec

A group may be *batched*: its members are axes of variables stacked on an axis
of size L (the layers of a scanned stack, a mixture's experts), each copy with
a permutation of its own, so its permutation is int[L, n]. Every member
AxisRef names the stacked axis (`batch`) and `spec.batch_sizes[group]` is L:

    PermutationSpec({"mlp": [AxisRef(("params", "blocks", "up", "kernel"), 2, batch=0),
                             AxisRef(("params", "blocks", "down", "kernel"), 1, batch=0)]},
                    {"mlp": 128}, batch_sizes={"mlp": 4})

AxisRef factors are kept canonical (`canonical_ref`), so a spec written by
hand and one traced from a jaxpr compare equal when they claim the same units.

The merged axis of a group is laid out `merged | A only | B only`:

    GroupLayout(n_merged, n_a, n_b)   width = n_merged + n_a + n_b

Merging a fraction r of a group of n units (the *merge ratio*; the PLeaS
reference code's `budget_ratio` is 1 - r) gives `n_merged = round_half_up(r n)`
and `n_a = n_b = n - n_merged`: r = 1 is one model's width, r = 0 keeps both
models whole side by side.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
import dataclasses
import json
import math
import numbers
import os
from typing import Any, NamedTuple

import numpy as np

from mergejax import tree


class AxisRef(NamedTuple):
  """One axis of one variable, as a member of a permutation group.

  Attributes:
    path: the variable's key path as key names (`mergejax.tree.key_path`),
      e.g. `("params", "Dense_0", "kernel")`.
    axis: the axis of that variable (non-negative).
    factor: None (the whole axis), or `(shape, index)`: the axis is viewed as
      `shape` (row-major, e.g. `(heads, head_dim)`, or `(h * w, channels)` for
      a flatten before a Dense layer) and the group permutes component `index`
      of that view. A PermutationSpec keeps factors canonical: `(outer, n,
      inner)` with outer and inner dropped where they are 1, and None where
      both are (see `canonical_ref`).
    part: None (the whole axis), or `(start, stop)`: the group permutes only
      units `start..stop-1` of the axis, a part of it that the function uses
      apart from the rest (one of the q, k, v of a fused projection split by
      `jnp.split`); a factor then views the part, not the whole axis. The
      units outside the part are left where they are.
    batch: None (one permutation for the whole variable), or the axis of the
      variable that indexes its stacked copies (a scanned stack's layers):
      the ref is a member of a batched group, whose permutation int[L, n]
      permutes copy l (the variable indexed l on `batch`) by row l. `axis`
      stays an axis of the whole variable (never `batch`); factor and part
      apply to every copy alike.
  """

  path: tuple[str, ...]
  axis: int
  factor: tuple[tuple[int, ...], int] | None = None
  part: tuple[int, int] | None = None
  batch: int | None = None


def _where(ref: AxisRef) -> str:
  part = "" if ref.part is None else f" [{ref.part[0]}:{ref.part[1]}]"
  batch = "" if ref.batch is None else f" (copies on axis {ref.batch})"
  return f"{tree.path_str(ref.path)} axis {ref.axis}{part}{batch}"


def _as_ref(value: Any) -> AxisRef:
  """An AxisRef from an AxisRef or a `(path, axis[, factor[, part[, batch]]])` sequence."""
  if isinstance(value, str) or not isinstance(value, Sequence) or len(value) not in (2, 3, 4, 5):
    raise ValueError(f"an AxisRef is (path, axis[, factor[, part[, batch]]]), got {value!r}")
  path, axis, *rest = value
  if isinstance(path, str) or not isinstance(path, Sequence):
    raise ValueError(f"AxisRef path must be a tuple of key names, got {path!r}")
  for key in path:
    if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)):
      raise ValueError(f"AxisRef path {path!r}: key {key!r} is not a name or an index")
  path = tuple(str(k) for k in path)
  if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis < 0:
    raise ValueError(f"{tree.path_str(path)}: axis must be a non-negative int, got {axis!r}")
  factor = rest[0] if rest else None
  part = rest[1] if len(rest) > 1 else None
  batch = rest[2] if len(rest) > 2 else None
  if batch is not None:
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0 or batch == axis:
      raise ValueError(f"{tree.path_str(path)} axis {axis}: batch must be a non-negative int other than"
                       f" the axis, got {batch!r}")
    batch = int(batch)
  if part is not None:
    if (isinstance(part, str) or not isinstance(part, Sequence) or len(part) != 2
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in part)
        or not 0 <= part[0] < part[1]):
      raise ValueError(f"{tree.path_str(path)} axis {axis}: part must be (start, stop), 0 <= start < stop,"
                       f" got {part!r}")
    part = (int(part[0]), int(part[1]))
  if factor is not None:
    if isinstance(factor, str) or not isinstance(factor, Sequence) or len(factor) != 2:
      raise ValueError(f"{tree.path_str(path)} axis {axis}: factor must be (shape, index), got {factor!r}")
    shape, index = factor
    if (isinstance(shape, str) or not isinstance(shape, Sequence)
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape)
        or isinstance(index, bool) or not isinstance(index, numbers.Integral)
        or not 0 <= index < len(shape)):
      raise ValueError(
          f"{tree.path_str(path)} axis {axis}: factor must be (shape of positive ints, index into"
          f" it), got {factor!r}"
      )
    factor = (tuple(int(d) for d in shape), int(index))
    if part is not None and math.prod(factor[0]) != part[1] - part[0]:
      raise ValueError(f"{tree.path_str(path)} axis {axis}: factor {factor} does not view the part {part}")
  return AxisRef(path, int(axis), factor, part, batch)


def canonical_ref(ref: AxisRef | Sequence[Any]) -> AxisRef:
  """`ref` with its factor in canonical form, so equal claims compare equal.

  A factor `(shape, index)` is rewritten as `(outer, n, inner)`, with outer =
  prod(shape[:index]), n = shape[index], inner = prod(shape[index + 1:]);
  outer and inner are dropped where they are 1 (n is always kept), and a
  factor whose outer and inner are both 1 becomes None (the whole axis). So
  `((4, 4, 32), 2)` becomes `((16, 32), 1)` and `((1, 8), 1)` becomes None.
  A part and a batch axis are kept as they are (the factor views the part).

  Raises:
    ValueError: naming the path, for a malformed path, axis or factor.
  """
  ref = _as_ref(ref)
  if ref.factor is None:
    return ref
  shape, index = ref.factor
  outer, n, inner = math.prod(shape[:index]), shape[index], math.prod(shape[index + 1:])
  if outer == 1 and inner == 1:
    return ref._replace(factor=None)
  view = ((outer,) if outer > 1 else ()) + (n,) + ((inner,) if inner > 1 else ())
  return ref._replace(factor=(view, 1 if outer > 1 else 0))


@dataclasses.dataclass(frozen=True, eq=False)
class PermutationSpec:
  """Groups of axes that share one permutation.

      spec = PermutationSpec(
          {"hidden": [AxisRef(("params", "dense_0", "kernel"), 1),
                      AxisRef(("params", "dense_0", "bias"), 0),
                      AxisRef(("params", "dense_1", "kernel"), 0)]},
          {"hidden": 128})

  Construction checks that groups and sizes name the same groups and
  normalises every AxisRef (`canonical_ref`); `check_spec` checks the spec
  against a variables tree. Group names and their order are the user's.
  Two specs are equal when they have the same group names, sizes, batch
  sizes and, per group, the same set of AxisRefs (their order within a group
  is free).

  Attributes:
    groups: group name -> the axes it permutes (a tuple of AxisRefs; may be
      empty, e.g. for a group of size 1, whose axes are never listed).
    sizes: group name -> the group's size n (the permuted dimension).
    batch_sizes: batched group name -> L, its number of copies (layers,
      experts); its permutation is int[L, n] and every AxisRef of it has a
      `batch` axis of size L. Groups not named here are ordinary (int[n],
      no AxisRef with a batch axis).
  """

  groups: Mapping[str, tuple[AxisRef, ...]]
  sizes: Mapping[str, int]
  batch_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if set(self.groups) != set(self.sizes):
      diff = sorted(set(self.groups) ^ set(self.sizes))
      raise ValueError(f"groups and sizes name different groups: {diff}")
    sizes = {}
    for name, size in self.sizes.items():
      if not isinstance(name, str):
        raise ValueError(f"group names must be str, got {name!r}")
      if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"group {name!r}: size must be a positive int, got {size!r}")
      sizes[name] = int(size)
    groups = {}
    for g, refs in self.groups.items():
      if isinstance(refs, (str, AxisRef)) or not isinstance(refs, Iterable):
        raise ValueError(f"group {g!r}: expected a sequence of AxisRefs, got {refs!r}")
      groups[g] = tuple(canonical_ref(r) for r in refs)
    if not isinstance(self.batch_sizes, Mapping):
      raise ValueError(f"batch_sizes maps batched group names to L, got {self.batch_sizes!r}")
    unknown = sorted(set(self.batch_sizes) - set(groups))
    if unknown:
      raise ValueError(f"batch_sizes names groups the spec does not have: {unknown}")
    for g, refs in groups.items():
      length = self.batch_sizes.get(g)
      if length is not None and (isinstance(length, bool) or not isinstance(length, numbers.Integral)
                                 or length < 1):
        raise ValueError(f"group {g!r}: batch size must be a positive int, got {length!r}")
      for r in refs:
        if (r.batch is None) != (length is None):
          kind = "a batched group" if length is not None else "an ordinary group (no batch size)"
          raise ValueError(f"group {g!r} is {kind}, but {_where(r)} "
                           + ("has no batch axis" if r.batch is None else "has a batch axis"))
    object.__setattr__(self, "groups", groups)
    object.__setattr__(self, "sizes", {g: sizes[g] for g in groups})
    object.__setattr__(self, "batch_sizes", {g: int(self.batch_sizes[g]) for g in groups
                                             if g in self.batch_sizes})

  @property
  def names(self) -> tuple[str, ...]:
    """The group names, in the order they were given."""
    return tuple(self.groups)

  def _key(self) -> dict[str, tuple[int, int | None, frozenset[AxisRef]]]:
    return {g: (self.sizes[g], self.batch_sizes.get(g), frozenset(refs)) for g, refs in self.groups.items()}

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, PermutationSpec):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self) -> int:
    return hash(frozenset(self._key().items()))

  def to_json(self) -> dict[str, Any]:
    """`{"groups": {name: [[path, axis, factor], ...]}, "sizes": {name: n}}`.

    Groups keep their order (and their AxisRefs theirs), so the text is
    deterministic; `factor` is null or `[shape, index]`; a ref with a part
    has a fourth entry `[start, stop]` (refs without one have three); a ref
    with a batch axis has a fifth, the axis (its fourth is then the part or
    null). A spec with batched groups has a third key, `"batch_sizes":
    {name: L}`.
    """
    def entry(r):
      out = [list(r.path), r.axis, None if r.factor is None else [list(r.factor[0]), r.factor[1]]]
      if r.batch is not None:
        return out + [None if r.part is None else list(r.part), r.batch]
      return out if r.part is None else out + [list(r.part)]

    out = {
        "groups": {
            g: [entry(r) for r in refs]
            for g, refs in self.groups.items()
        },
        "sizes": dict(self.sizes),
    }
    if self.batch_sizes:
      out["batch_sizes"] = dict(self.batch_sizes)
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "PermutationSpec":
    """The inverse of `to_json`.

    Raises:
      ValueError: for anything but `{"groups": {...}, "sizes": {...}[,
        "batch_sizes": {...}]}` of the shapes `to_json` writes.
    """
    if not isinstance(data, Mapping) or not {"groups", "sizes"} <= set(data) <= {
        "groups", "sizes", "batch_sizes"}:
      keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
      raise ValueError(f"a PermutationSpec in JSON has keys ['groups', 'sizes'], got {keys}"
                       " (a batched one also 'batch_sizes')")
    batch_sizes = data.get("batch_sizes", {})
    if not all(isinstance(data[k], Mapping) for k in ("groups", "sizes")) or not isinstance(batch_sizes, Mapping):
      raise ValueError("a PermutationSpec in JSON maps group names to refs, to sizes and to batch sizes")
    return cls(dict(data["groups"]), dict(data["sizes"]), dict(batch_sizes))


def save_spec(path: str | os.PathLike, spec: PermutationSpec) -> None:
  """Writes `spec` as JSON (`PermutationSpec.to_json`) to the file `path`."""
  with open(path, "w") as f:
    json.dump(spec.to_json(), f, indent=1)
    f.write("\n")


def load_spec(path: str | os.PathLike) -> PermutationSpec:
  """The PermutationSpec saved by `save_spec` in the file `path`."""
  with open(path) as f:
    return PermutationSpec.from_json(json.load(f))


class _Claim(NamedTuple):
  """The units one AxisRef permutes: the middle of `(outer, n, inner)` of units start..stop-1."""

  group: str
  outer: int
  n: int
  inner: int
  factored: bool
  start: int = 0
  stop: int = 0


def _claim(group: str, ref: AxisRef, size: int) -> _Claim:
  start, stop = ref.part if ref.part is not None else (0, size)
  if ref.factor is None:
    return _Claim(group, 1, stop - start, 1, False, start, stop)
  view, index = ref.factor
  outer = math.prod(view[:index])
  return _Claim(group, outer, view[index], (stop - start) // (outer * view[index]), True, start, stop)


def _restrict(a: _Claim, start: int, stop: int) -> _Claim | None:
  """Claim `a` seen on units start..stop-1 inside its own; None if that cuts its blocks."""
  block = a.n * a.inner
  if (start - a.start) % block or (stop - a.start) % block:
    return None
  outer = (stop - start) // block
  return _Claim(a.group, outer, a.n, a.inner, outer > 1 or a.inner > 1, start, stop)


def _conflict(a: _Claim, b: _Claim, where: str) -> str | None:
  """Why claims `a` and `b` on one axis cannot both hold, or None if they can.

  Two factored claims hold together when they permute different components
  of one common view of the axis: one's block `n * inner` divides the
  other's `inner` (e.g. `(2, 12)` and `(6, 4)` are components 0 and 2 of the
  view `(2, 3, 4)`). Claims on disjoint parts always hold together; a claim
  on a part inside another's is compared with the other's blocks inside that
  part (which must not be cut by it).
  """
  if a.stop <= b.start or b.stop <= a.start:
    return None
  if (a.start, a.stop) != (b.start, b.stop):
    inner_, outer_ = (a, b) if b.start <= a.start and a.stop <= b.stop else (b, a)
    if not (outer_.start <= inner_.start and inner_.stop <= outer_.stop):
      return f"{where}: groups {a.group!r} and {b.group!r} claim overlapping parts of it"
    restricted = _restrict(outer_, inner_.start, inner_.stop)
    if restricted is None:
      return (f"{where}: group {inner_.group!r} claims units {inner_.start}..{inner_.stop - 1}, which cut"
              f" the blocks of group {outer_.group!r}")
    a, b = inner_, restricted
  if not (a.factored and b.factored) or (a.outer, a.n, a.inner) == (b.outer, b.n, b.inner):
    return f"{where} is claimed by groups {a.group!r} and {b.group!r}"
  if a.inner % (b.n * b.inner) == 0 or b.inner % (a.n * a.inner) == 0:
    return None
  return (
      f"{where}: incompatible factors: group {a.group!r} permutes {(a.outer, a.n, a.inner)}"
      f" and group {b.group!r} {(b.outer, b.n, b.inner)} (as (outer, n, inner)); they"
      " overlap, not components of one view"
  )


def check_spec(spec: PermutationSpec, variables: Any) -> None:
  """Raises ValueError unless `spec` fits `variables`.

  Checks that every AxisRef's path names a leaf of `variables` (key names as
  `mergejax.tree.key_path` gives them), its axis is in range, and the sizes
  agree: a whole axis has the group's size; a factored one is viewed by a
  shape whose product is the axis size and whose permuted component has the
  group's size. No axis is claimed twice: a whole-axis AxisRef excludes any
  other on the same axis (or overlapping part), parts of one axis are
  disjoint or nested, and factored ones must permute different
  components of one common view of it. A batched group's refs have their
  batch axis in range, of the group's batch size, and no group claims an
  axis that some batched ref uses as its batch axis.

  Args:
    spec: the groups.
    variables: a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Raises:
    ValueError: naming the path, e.g. `params/hidden_0/kernel axis 1: size 64,
      group 'hidden_0' has 32`.
  """
  shapes = {path: tuple(np.shape(leaf)) for path, leaf in tree.leaves_by_path(variables).items()}
  claims: dict[tuple[tuple[str, ...], int], list[_Claim]] = {}
  batch_axes: dict[tuple[tuple[str, ...], int], str] = {}
  for g, refs in spec.groups.items():
    n = spec.sizes[g]
    for ref in refs:
      where = _where(ref)
      if ref.path not in shapes:
        raise ValueError(f"group {g!r}: no variable {tree.path_str(ref.path)}")
      shape = shapes[ref.path]
      if not 0 <= ref.axis < len(shape):
        raise ValueError(f"group {g!r}: {where} out of range for shape {shape}")
      size = shape[ref.axis]
      if ref.part is not None:
        if ref.part[1] > size:
          raise ValueError(f"{where}: part out of range for size {size}")
        size = ref.part[1] - ref.part[0]
      if ref.factor is None and size != n:
        raise ValueError(f"{where}: size {size}, group {g!r} has {n}")
      if ref.factor is not None:
        view, index = ref.factor
        if math.prod(view) != size or view[index] != n:
          raise ValueError(
              f"{where}: factor {ref.factor} does not view size {size} with {n} units of group {g!r}"
          )
      if ref.batch is not None:
        if ref.batch >= len(shape):
          raise ValueError(f"group {g!r}: {where}: batch axis out of range for shape {shape}")
        if shape[ref.batch] != spec.batch_sizes[g]:
          raise ValueError(f"{where}: {shape[ref.batch]} copies, group {g!r} has {spec.batch_sizes[g]}")
        batch_axes.setdefault((ref.path, ref.batch), g)
      claim = _claim(g, ref, shape[ref.axis])
      for seen in claims.get((ref.path, ref.axis), []):
        problem = _conflict(seen, claim, where)
        if problem:
          raise ValueError(problem)
      claims.setdefault((ref.path, ref.axis), []).append(claim)
  for (path, axis), g in batch_axes.items():
    if (path, axis) in claims:
      raise ValueError(f"{tree.path_str(path)} axis {axis} indexes the copies of group {g!r} and is"
                       f" permuted by group {claims[(path, axis)][0].group!r}")


def permutation_to_json(perm: Mapping[str, Any]) -> dict[str, list]:
  """`{group: [ints]}` (a batched group's: `[[ints]] * L`), in the permutation's group order."""
  return {g: np.asarray(p).astype(int).tolist() for g, p in perm.items()}


def permutation_from_json(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `permutation_to_json`: `{group: int32[n] or int32[L, n]}`."""
  return {g: np.asarray(p, np.int32) for g, p in data.items()}


def save_permutation(path: str | os.PathLike, perm: Mapping[str, Any]) -> None:
  """Writes `perm` (`{group: int[n] or int[L, n]}`) as JSON to the file `path`."""
  with open(path, "w") as f:
    json.dump(permutation_to_json(perm), f)
    f.write("\n")


def load_permutation(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The permutation saved by `save_permutation`: `{group: int32[n] or int32[L, n]}`."""
  with open(path) as f:
    return permutation_from_json(json.load(f))


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
