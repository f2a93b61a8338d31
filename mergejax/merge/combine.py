"""Combining two aligned models unit by unit into one model of any width.

A `UnitMap` says, for one permutation group of n units, where each unit of
the merged model comes from. Number the concatenated units of both models
`0..n-1` (model A) and `n..2n-1` (model B, already aligned to A):

    merged unit p     = sum_k weight[p, k] * unit[index[p, k]]   (merge)
    unit k is read as   merged unit unmerge[k]                   (unmerge)

PLeaS's partial matching (`partial_map`: merged pairs, then A's kept units,
then B's: DESIGN.md, MergeLayout) and ZipIt! both produce UnitMaps;
`combine_leaf` and `combine` apply them to arrays and to whole variable trees.

    maps = {g: partial_map(merged_units[g]) for g in spec.groups}
    w0 = combine(spec, maps, va, vb_aligned, inputs=kernel_input_axes)

A leaf's grouped axis is an *output* axis (its units are merged rows) unless
the leaf is a kernel that contracts it with the layer's input: then it is an
*input* axis, whose original units are summed onto the merged unit they are
read from. Each entry averages the contributions of the models that reach
it: an output kept from A reads nothing kept only from B (a structural zero),
and a leaf without grouped output axes (a shared classifier and its bias)
is the mean of both models' (so with nothing merged the merged network
computes the ensemble). `models=(0,)` restricts a leaf to model A (a task
head of its own).
"""

from collections.abc import Mapping, Sequence
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import tree

PyTree = Any


class UnitMap(NamedTuple):
  """How one group's merged units come from both models' units.

  Attributes:
    index: int32[w, k], concatenated unit indices (A: 0..n-1, B: n..2n-1)
      each merged unit combines (k = 2 for pairs; ZipIt! may merge more).
    weight: f32[w, k], their weights (a unit alone is `(1, 0)`).
    unmerge: int32[2n], the merged unit each original unit is read from.
  """

  index: np.ndarray
  weight: np.ndarray
  unmerge: np.ndarray

  @property
  def width(self) -> int:
    return self.index.shape[0]

  @property
  def size(self) -> int:
    return self.unmerge.shape[0] // 2


def partial_map(merged: Sequence[bool]) -> UnitMap:
  """PLeaS's layout: `merged | A only | B only`, each part in unit order.

  Args:
    merged: bool[n], the (aligned) pairs to merge; the others are kept from
      both models.
  """
  merged = np.asarray(merged, bool)
  n = merged.shape[0]
  both, kept = np.flatnonzero(merged), np.flatnonzero(~merged)
  m, k = both.size, kept.size
  index = np.concatenate([np.stack([both, both + n], 1), np.stack([kept, kept], 1),
                          np.stack([kept + n, kept + n], 1)]).astype(np.int32)
  weight = np.concatenate([np.full((m, 2), 0.5), np.tile([[1.0, 0.0]], (2 * k, 1))]).astype(np.float32)
  unmerge = np.empty(2 * n, np.int32)
  unmerge[both] = unmerge[both + n] = np.arange(m)
  unmerge[kept] = m + np.arange(k)
  unmerge[kept + n] = m + k + np.arange(k)
  return UnitMap(index, weight, unmerge)


def layout_of(maps: Mapping[str, UnitMap | Sequence[UnitMap]]) -> spec_lib.MergeLayout:
  """The MergeLayout of UnitMaps: a group w units wide out of n per model
  merges 2n - w, and keeps the rest of each (DESIGN.md, MergeLayout).

  A batched group's value may be a sequence of UnitMaps, one per copy: they
  must have one width (stacked copies keep one shape), and the group gets
  that one GroupLayout.

  Raises:
    ValueError: naming the group, where its copies' maps differ in size or width.
  """
  out = {}
  for g, m in maps.items():
    copies = list(m) if isinstance(m, (list, tuple)) and not isinstance(m, UnitMap) else [m]
    shapes = sorted({(c.size, c.width) for c in copies})
    if len(shapes) != 1:
      raise ValueError(f"layout_of: the copies of group {g!r} have (units, width) {shapes}; stacked copies"
                       " need one width")
    size, width = shapes[0]
    merged = 2 * size - width
    out[g] = (merged, size - merged, size - merged)
  return spec_lib.MergeLayout(out)


def fixed_groups(spec: spec_lib.PermutationSpec,
                 inputs: Mapping[tuple[str, ...], frozenset[int]]) -> frozenset[str]:
  """Groups that are never widened: an inner one of several grouped axes on
  one side of a leaf (attention's head_dim, inside heads, in a query kernel
  `(embed, heads, head_dim)` or a `(heads, head_dim)` view), since widening
  it would add the kept units of A and B into one head's dot products.

  Args:
    spec: the groups.
    inputs: kernel path -> the kernel axes it contracts with its input (the
      input side; every other axis is on the output side).
  """
  out = {g for g, refs in spec.groups.items() if not refs}  # no leaf would carry a new width
  for path, refs in refs_by_leaf(spec).items():
    ndim = 1 + max(r.axis for _, r in refs)
    shape = [max([0] + [r.part[1] for _, r in refs if r.axis == a and r.part]) for a in range(ndim)]
    contracted = inputs.get(path, frozenset())
    for piece in leaf_pieces(shape, refs, tree.path_str(path)):  # each part of a fused axis apart
      view = piece.view
      sides: dict[bool, list[tuple[int, str]]] = {}
      for pos, g in view.groups:
        axis = next(a for a in range(len(view.parts)) if pos < sum(view.parts[:a + 1]))
        sides.setdefault(axis in contracted, []).append((pos, g))
      for grouped in sides.values():
        outer = min(grouped)[1]
        out.update(g for _, g in grouped if g != outer)
  return frozenset(out)


class ModelPart(NamedTuple):
  """One model's share of a UnitMap, in that model's own unit numbers.

  Attributes:
    index: int32[w, k], the model's units each merged unit takes (0 where
      the weight is 0).
    weight: f32[w, k], their weights; 0 for the other model's units.
    unmerge: int32[n], the merged unit each of the model's units is read from.
  """

  index: np.ndarray
  weight: np.ndarray
  unmerge: np.ndarray


def model_part(m: UnitMap, model: int) -> ModelPart:
  """Model `model`'s (0: A, 1: B) share of `m`."""
  n = m.size
  own = (m.index >= model * n) & (m.index < (model + 1) * n)
  return ModelPart(np.where(own, m.index - model * n, 0).astype(np.int32),
                   np.where(own, m.weight, 0.0).astype(np.float32),
                   m.unmerge[model * n:(model + 1) * n])


class Axis(NamedTuple):
  """A grouped axis of an array: its position, map, and role."""

  axis: int
  map: UnitMap
  is_input: bool


def _along(xp, v: np.ndarray, axis: int, ndim: int):
  return xp.reshape(xp.asarray(v), [-1 if d == axis else 1 for d in range(ndim)])


def _segment_sum_jax(x: jax.Array, segments: np.ndarray, width: int) -> jax.Array:
  return jax.ops.segment_sum(x, segments, num_segments=width, mode="promise_in_bounds")


def _segment_sum_numpy(x: np.ndarray, segments: np.ndarray, width: int) -> np.ndarray:
  """summed[segments[i]] += x[i]: a sparse 0/1 product (np.add.at is unbuffered, so slow)."""
  n = x.shape[0]
  scatter = scipy.sparse.csr_array((np.ones(n, x.dtype), (segments, np.arange(n))), shape=(width, n))
  return (scatter @ x.reshape(n, -1)).reshape(width, *x.shape[1:])


_SEGMENT_SUM = {jnp: _segment_sum_jax, np: _segment_sum_numpy}


def merge_parts(x: jax.Array, axes: Sequence[tuple[int, ModelPart, bool]], xp=jnp) -> tuple[jax.Array, jax.Array]:
  """One model's contribution to the merged array, and its weight mass.

  Args:
    x: the model's array.
    axes: each grouped axis as `(axis, the model's part, is_input)`.
    xp: the array namespace computing it: `jax.numpy` (traceable) or `numpy`
      (on the host, nothing compiled); both do the same arithmetic.

  Returns:
    `(contribution, mass)`: the model's units merged along output axes and
    summed along input axes, and f32 broadcastable to it: the total weight
    the model has at each merged output position (the normaliser's share).
  """
  mass = xp.float32(1.0)
  for axis, part, is_input in axes:
    width, k = part.index.shape
    if is_input:
      x = xp.moveaxis(_SEGMENT_SUM[xp](xp.moveaxis(x, axis, 0), part.unmerge, width), 0, axis)
    else:
      x = sum(xp.take(x, part.index[:, j], axis=axis, mode="clip") * _along(xp, part.weight[:, j], axis, x.ndim)
              for j in range(k))
      mass = mass * _along(xp, part.weight.sum(1), axis, x.ndim)
  return x, mass


def combine_leaf(xs: Sequence[jax.Array], axes: Sequence[Axis], models: Sequence[int] = (0, 1)) -> jax.Array:
  """The merged array: the models' contributions over their total weight.

  Args:
    xs: `(x_a, x_b)`, the same leaf of both (aligned) models.
    axes: the leaf's grouped axes (positions in `xs[0]`).
    models: the models whose contributions reach this leaf.
  """
  return combine_parts(xs, {m: [(ax.axis, model_part(ax.map, m), ax.is_input) for ax in axes] for m in models})


def combine_parts(xs: Sequence[jax.Array],
                  sides: Mapping[int, Sequence[tuple[int, ModelPart, bool]]], xp=jnp) -> jax.Array:
  """`combine_leaf` given, per model reaching the leaf, its `merge_parts` axes (in namespace `xp`)."""
  total, norm = 0.0, 0.0
  for model, axes in sides.items():
    part, mass = merge_parts(xp.asarray(xs[model]), axes, xp)
    total, norm = total + part, norm + mass
  return xp.where(norm > 0, total / xp.where(norm > 0, norm, 1.0), 0.0).astype(xp.result_type(xs[0]))


class LeafView(NamedTuple):
  """A leaf seen with its factored axes split into their components.

  Attributes:
    shape: the split shape.
    groups: (position in the split shape, group) of every grouped component.
    parts: how many split axes each original axis became.
  """

  shape: tuple[int, ...]
  groups: tuple[tuple[int, str], ...]
  parts: tuple[int, ...]

  def merged_shape(self, widths: Mapping[str, int]) -> tuple[int, ...]:
    """The original axes' sizes once every grouped component is `widths[g]` wide."""
    split = list(self.shape)
    for pos, g in self.groups:
      split[pos] = widths[g]
    out, start = [], 0
    for k in self.parts:
      out.append(int(np.prod(split[start:start + k], dtype=np.int64)))
      start += k
    return tuple(out)


def leaf_view(shape: Sequence[int], refs: Sequence[tuple[str, spec_lib.AxisRef]], where: str = "") -> LeafView:
  """The split view of a leaf of `shape` with grouped `refs` (group, AxisRef).

  Raises:
    ValueError: when two refs view one axis differently.
  """
  views: dict[int, tuple[int, ...]] = {}
  for g, r in refs:
    if r.part is not None:
      raise NotImplementedError(
          f"{where or tree.path_str(r.path)}: group {g!r} permutes a part of axis {r.axis} ({r.part});"
          " a LeafView is one piece of a leaf: split the leaf into its parts with `leaf_pieces`")
  # Each axis's views are refined to one: the strides of every view's components together
  # (GQA's queries: kv heads as (kv, rep * hd) and queries per kv head as (kv, rep, hd)).
  strides: dict[int, set[int]] = {}
  for g, r in refs:
    if r.factor is not None:
      view = tuple(r.factor[0])
      strides.setdefault(r.axis, set()).update(math.prod(view[i:]) for i in range(len(view) + 1))
  views: dict[int, tuple[int, ...]] = {}
  for a, ss in strides.items():
    ss = sorted(ss, reverse=True)
    if any(big % small for big, small in zip(ss, ss[1:])):
      raise ValueError(f"{where}: axis {a} is viewed in ways no one view refines; a merge needs one view per"
                       " axis")
    views[a] = tuple(big // small for big, small in zip(ss, ss[1:]))

  def position(r):
    if r.factor is None:
      return 0
    view, index = r.factor
    stride, size = math.prod(view[index + 1:]), view[index]
    inner = [math.prod(views[r.axis][i + 1:]) for i in range(len(views[r.axis]))]
    i = inner.index(stride)
    if views[r.axis][i] != size:
      raise ValueError(f"{where}: axis {r.axis} is viewed both as {views[r.axis]} and as {tuple(view)};"
                       " a merge needs one view per axis")
    return i

  split, offsets, parts = [], [], []
  for a, n in enumerate(shape):
    offsets.append(len(split))
    view = views.get(a, (n,))
    split.extend(view)
    parts.append(len(view))
  groups = tuple(sorted((offsets[r.axis] + position(r), g) for g, r in refs))
  return LeafView(tuple(split), groups, tuple(parts))


class Piece(NamedTuple):
  """One piece of a leaf: a part of a fused axis (q, k or v of GPT-2's c_attn), or the whole leaf.

  Attributes:
    axis: the axis cut into parts, or None (the piece is the whole leaf).
    start, stop: the piece's units along `axis` (0 and the leaf's shape where None).
    view: the piece's LeafView (its refs' parts dropped, their factors viewing the piece).
  """

  axis: int | None
  start: int
  stop: int
  view: LeafView


def leaf_pieces(shape: Sequence[int], refs: Sequence[tuple[str, spec_lib.AxisRef]], where: str = "") -> list[Piece]:
  """A leaf cut along its fused axis into consecutive pieces, each merged on its own.

  Refs with a `part` cut one axis into the parts and the gaps between them
  (units no group permutes); each piece is laid out by its own groups
  (`merged | A only | B only` per group inside its range) and the merged leaf
  is the pieces concatenated back in order. A leaf without parts is one piece.

  Raises:
    NotImplementedError: for parts on more than one axis of a leaf, nested
      parts, or a ref without a part on the cut axis (a group permuting the
      whole fused axis around its parts).
  """
  parted = sorted({r.axis for _, r in refs if r.part is not None})
  if not parted:
    return [Piece(None, 0, shape[0] if len(shape) else 0, leaf_view(shape, refs, where))]
  if len(parted) > 1:
    raise NotImplementedError(f"{where}: parts on axes {parted} of one leaf; merges lay out parts of one axis")
  axis = parted[0]
  whole = [g for g, r in refs if r.axis == axis and r.part is None]
  if whole:
    raise NotImplementedError(f"{where}: groups {whole} permute all of axis {axis}, which other groups cut"
                              " into parts; merges lay out disjoint parts only")
  spans = sorted({r.part for _, r in refs if r.part is not None})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start < stop:
      raise NotImplementedError(f"{where}: nested or overlapping parts {spans} of axis {axis}; merges lay out"
                                " disjoint parts only")
  cuts, at = [], 0
  for start, stop in spans:
    if start > at:
      cuts.append((at, start))
    cuts.append((start, stop))
    at = stop
  if at < shape[axis]:
    cuts.append((at, shape[axis]))
  out = []
  for start, stop in cuts:
    own = [(g, r._replace(part=None)) for g, r in refs if r.axis != axis or r.part == (start, stop)]
    piece_shape = list(shape)
    piece_shape[axis] = stop - start
    out.append(Piece(axis, start, stop, leaf_view(piece_shape, own, where)))
  return out


def refs_by_leaf(spec: spec_lib.PermutationSpec) -> dict[tuple[str, ...], list[tuple[str, spec_lib.AxisRef]]]:
  """Leaf path -> its (group, AxisRef)s."""
  out: dict[tuple[str, ...], list] = {}
  for g, refs in spec.groups.items():
    for r in refs:
      out.setdefault(tuple(r.path), []).append((g, r))
  return out


def combine(
    spec: spec_lib.PermutationSpec,
    maps: Mapping[str, UnitMap | Sequence[UnitMap]],
    va: PyTree,
    vb: PyTree,
    *,
    inputs: Mapping[tuple[str, ...], frozenset[int]] | None = None,
    models: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
    backend: str | None = None,
) -> PyTree:
  """Every leaf of two aligned models combined by `maps` (see the module doc).

  A spec with batched groups (stacked copies, e.g. layers under `scan`) is
  combined as the unrolled model: `stack(spec, combine(flat_spec, flat_maps,
  unstack(va), unstack(vb)))` (`mergejax.stacked`), so each copy of a
  batched group is laid out by its own map and all copies keep one width.

  Args:
    spec: the permutation groups; `maps` has one UnitMap per group, of its size.
    maps: group -> UnitMap; for a batched group of L copies, one UnitMap for
      every copy or a sequence of L of one width (copy l merged by entry l).
    va, vb: the models' variables, `vb` aligned to `va`.
    inputs: kernel path -> the kernel axes it contracts with its input; for a
      stacked kernel, keyed by its path (axes of the stacked leaf) or by its
      copies' (`path + (str(l),)`, axes of a copy).
    models: leaf path -> the models reaching it (default both); `(0,)` for
      model A's own task head.
    backend: "host" (NumPy gathers: nothing compiled), "device" (every leaf
      in one jitted program, compiled once per plan), or None: "device" when
      any leaf is a jax.Array off the CPU, else "host" (on a CPU the program's
      compilation cost more than the gathers: ResNet-50, 25M parameters).

  Returns:
    The merged variables, each grouped axis `maps[g].width` wide.

  Raises:
    ValueError: naming the group, for a missing map, a map of the wrong size,
      or a batched group's maps of different widths.
  """
  if spec.batch_sizes:
    return _combine_stacked(spec, maps, va, vb, inputs or {}, models or {}, backend)
  missing = sorted(set(spec.groups) - set(maps))
  if missing:
    raise ValueError(f"combine: no UnitMap for groups {missing}")
  for g, m in maps.items():
    if g in spec.sizes and m.size != spec.sizes[g]:
      raise ValueError(f"combine: group {g!r} has {spec.sizes[g]} units but its UnitMap {m.size}")
  inputs, models = inputs or {}, models or {}
  by_leaf = refs_by_leaf(spec)
  widths = {g: m.width for g, m in maps.items()}
  leaves_a, leaves_b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
  plan = []
  for path, xa in leaves_a.items():
    for piece in leaf_pieces(np.shape(xa), by_leaf.get(path, []), tree.path_str(path)):
      view = piece.view
      split_inputs = {p for a in inputs.get(path, frozenset()) for p in _split_positions(view, a)}
      axes = tuple((pos, g, pos in split_inputs) for pos, g in view.groups)
      cut = None if piece.axis is None else (piece.axis, piece.start, piece.stop)
      plan.append(_LeafPlan(path, cut, view.shape, axes, tuple(models.get(path, (0, 1))),
                            view.merged_shape(widths)))
  used = {g for p in plan for _, g, _ in p.axes}
  parts = {g: (model_part(maps[g], 0), model_part(maps[g], 1)) for g in used}
  if pick_backend(backend, [*leaves_a.values(), *leaves_b.values()], "combine") == "host":
    out = {p: jax.device_put(x) for p, x in _combine_leaves_in(np, plan, parts, leaves_a, leaves_b).items()}
  else:
    out = _combine_leaves(tuple(plan), parts, leaves_a, leaves_b)
  return tree.replace_leaves(va, out)


BACKENDS = ("host", "device")


def pick_backend(backend: str | None, arrays: Sequence[Any], where: str) -> str:
  """`backend`, or by default where `arrays` live: "device" when any is a jax.Array off the CPU, else "host"."""
  if backend is None:
    off_cpu = any(isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()) for x in arrays)
    return "device" if off_cpu else "host"
  if backend not in BACKENDS:
    raise ValueError(f"{where}: backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend


def _combine_stacked(spec, maps, va, vb, inputs, models, backend) -> PyTree:
  """`combine` of a batched spec, through the unrolled model (`mergejax.stacked`)."""
  missing = sorted(set(spec.groups) - set(maps))
  if missing:
    raise ValueError(f"combine: no UnitMap for groups {missing}")
  layout_of({g: maps[g] for g in spec.batch_sizes})  # one width per batched group
  cut = stacked.stacked_leaves(spec)
  flat_spec, fa = stacked.unstack(spec, va)
  fb = stacked.unstack(spec, vb)[1]
  leaves = tree.leaves_by_path(va)
  counts = {p: np.shape(leaves[p])[a] for p, a in cut.items()}
  merged = combine(flat_spec, stacked.unstack_per_copy(spec, maps, "combine"), fa, fb,
                   inputs=stacked.unstack_leaf_keys(inputs, cut, counts, axes=True),
                   models=stacked.unstack_leaf_keys(models, cut, counts), backend=backend)
  return stacked.stack(spec, merged)


class _LeafPlan(NamedTuple):
  """How `combine` merges one leaf: the static part of its work."""

  path: tuple[str, ...]
  cut: tuple[int, int, int] | None  # (axis, start, stop): one piece of a fused axis (`leaf_pieces`)
  split_shape: tuple[int, ...]
  axes: tuple[tuple[int, str, bool], ...]  # (position in split_shape, group, is_input)
  models: tuple[int, ...]
  merged_shape: tuple[int, ...]


def _combine_leaves_in(xp, plan: Sequence[_LeafPlan], parts: Mapping[str, tuple[ModelPart, ModelPart]],
                       leaves_a: Mapping[tuple[str, ...], Any],
                       leaves_b: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
  """Every leaf combined, in array namespace `xp` (`jax.numpy` under jit, or `numpy` on the host)."""
  pieces: dict[tuple[str, ...], list[tuple[int | None, Any]]] = {}
  for p in plan:
    sides = {m: [(pos, parts[g][m], is_input) for pos, g, is_input in p.axes] for m in p.models}
    xs = []
    for leaves in (leaves_a, leaves_b):
      x = xp.asarray(leaves[p.path])
      if p.cut is not None:
        axis, start, stop = p.cut
        x = x[(slice(None),) * axis + (slice(start, stop),)]
      xs.append(xp.reshape(x, p.split_shape))
    merged = xp.reshape(combine_parts(xs, sides, xp), p.merged_shape)
    pieces.setdefault(p.path, []).append((None if p.cut is None else p.cut[0], merged))
  return {path: ps[0][1] if ps[0][0] is None else xp.concatenate([x for _, x in ps], axis=ps[0][0])
          for path, ps in pieces.items()}


@functools.partial(jax.jit, static_argnums=0)
def _combine_leaves(plan: tuple[_LeafPlan, ...], parts: Mapping[str, tuple[ModelPart, ModelPart]],
                    leaves_a: Mapping[tuple[str, ...], jax.Array],
                    leaves_b: Mapping[tuple[str, ...], jax.Array]) -> dict[tuple[str, ...], jax.Array]:
  """Every leaf combined, in one compiled program (compiled once per plan)."""
  return _combine_leaves_in(jnp, plan, parts, leaves_a, leaves_b)


def _split_positions(view: LeafView, axis: int) -> range:
  """The positions of original axis `axis`'s components in the split shape."""
  start = sum(view.parts[:axis])
  return range(start, start + view.parts[axis])
