"""Applying, inverting and composing permutations over whole variable trees.

    perm = random_permutation(spec, key)             # {group: int32[n]}
    permuted = apply_permutation(spec, perm, variables)
    apply_permutation(spec, invert_permutation(perm), permuted)   # == variables

Permutations are gathers (DESIGN.md): for every AxisRef of group g,
`take(leaf, perm[g], axis)` (for a factored axis, along its component of the
view), so B's unit `perm[g][i]` lands on A's unit i. A permutation is a dict
`{group: int[n]}` over exactly the spec's groups; a batched group's (stacked
copies, `spec.batch_sizes[g] = L`) is int[L, n], row l permuting copy l.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import spec as spec_lib
from mergejax import tree

PyTree = Any
Perm = dict[str, jax.Array]


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def take_units(x: jax.Array, perm: jax.Array, ref: spec_lib.AxisRef) -> jax.Array:
  """`x` with the units of `ref`'s axis (or axis component) gathered by `perm`.

  Args:
    x: the leaf `ref` points at, any shape and dtype.
    perm: int[n], the units' new order: unit i of the result is unit
      `perm[i]` of `x`; int[L, n] for a ref with a batch axis (row l gathers
      copy l, the leaf indexed l on `ref.batch`).
    ref: the axis; with a factor `(view, index)` the axis is reshaped to
      `view`, gathered along component `index`, and reshaped back; with a
      part `(start, stop)` only those units are gathered (the factor views
      them), the others stay.

  Returns:
    An array of `x`'s shape and dtype (a NumPy array when `x` is one and
    `perm` is concrete, so NumPy dtypes such as float64 are kept).
  """
  xp = np if isinstance(x, np.ndarray) and not _is_traced(perm) else jnp
  perm = np.asarray(perm) if xp is np else perm
  if ref.batch is not None:
    copy = ref._replace(axis=ref.axis - (ref.axis > ref.batch), batch=None)
    index = lambda l: (slice(None),) * ref.batch + (l,)  # noqa: E731
    return xp.stack([take_units(x[index(l)], perm[l], copy) for l in range(x.shape[ref.batch])], axis=ref.batch)
  if ref.part is not None:
    start, stop = ref.part
    cut = lambda a, b: x[(slice(None),) * ref.axis + (slice(a, b),)]
    inside = take_units(cut(start, stop), perm, ref._replace(part=None))
    return xp.concatenate([cut(0, start), inside, cut(stop, None)], axis=ref.axis)
  if ref.factor is None:
    return xp.take(x, perm, axis=ref.axis)
  view, index = ref.factor
  shape = x.shape
  viewed = xp.reshape(x, shape[:ref.axis] + tuple(view) + shape[ref.axis + 1:])
  return xp.reshape(xp.take(viewed, perm, axis=ref.axis + index), shape)


def check_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any]) -> None:
  """Raises ValueError unless `perm` holds one permutation per group of `spec`.

  `perm` must name exactly the spec's groups, and each `perm[g]` must be an
  integer array of shape `(sizes[g],)`, or `(batch_sizes[g], sizes[g])` for
  a batched group. Concrete values must be permutations of
  `range(sizes[g])` (each row); traced ones (under jit) are checked by shape
  and dtype only.

  Raises:
    ValueError: naming the missing or unknown groups, or the group whose
      permutation is wrong.
  """
  if not isinstance(perm, Mapping):
    raise ValueError(f"a permutation is a dict {{group: int[n]}}, got {type(perm).__name__}")
  missing, unknown = sorted(set(spec.groups) - set(perm)), sorted(set(perm) - set(spec.groups))
  if missing or unknown:
    raise ValueError(f"permutation: missing groups {missing}, unknown groups {unknown}")
  for g in spec.groups:
    p, n = perm[g], spec.sizes[g]
    want = (n,) if g not in spec.batch_sizes else (spec.batch_sizes[g], n)
    shape, dtype = tuple(np.shape(p)), jnp.result_type(p)
    if shape != want or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"permutation of group {g!r}: expected int{list(want)}, got {dtype}{list(shape)}")
    if not _is_traced(p) and not np.array_equal(np.sort(np.asarray(p), axis=-1),
                                                np.broadcast_to(np.arange(n), want)):
      raise ValueError(f"permutation of group {g!r} is not a permutation of range({n})"
                       + (" in every row" if len(want) == 2 else ""))


def apply_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any], variables: PyTree) -> PyTree:
  """`variables` with every group's axes gathered by `perm[group]`.

  For every group g and each of its AxisRefs, the leaf becomes
  `take(leaf, perm[g], axis)` (along the factor's component for a factored
  axis): unit i of the result is unit `perm[g][i]` of `variables`. With `va`
  and `vb` two models and `perm` matching B's units to A's, the result is B
  aligned to A, computing the same function as B.

  Works under `jax.jit` (traced permutations are checked by shape and dtype).

  Args:
    spec: the groups; it must fit `variables` (`spec.check_spec`).
    perm: group -> int[n], a permutation of range(n), for exactly the spec's
      groups; int[L, n] for a batched group (row l permutes copy l of each
      member).
    variables: the tree to permute (arrays of any dtype, kept).

  Returns:
    A tree of the same structure, shapes and dtypes; leaves no group touches
    are the same objects.

  Raises:
    ValueError: before any work, for a bad permutation (`check_permutation`)
      or a spec that does not fit `variables` (`spec.check_spec`).
  """
  check_permutation(spec, perm)
  spec_lib.check_spec(spec, variables)
  leaves = tree.leaves_by_path(variables)
  updates = {}
  for g, refs in spec.groups.items():
    for ref in refs:
      updates[ref.path] = _take_keeping_sharding(updates.get(ref.path, leaves[ref.path]), perm[g], ref)
  return tree.replace_leaves(variables, updates)


def _take_keeping_sharding(x: Any, perm: Any, ref: spec_lib.AxisRef) -> Any:
  """`take_units`, compiled to keep x's `NamedSharding` (a sharded leaf is
  permuted shard by shard, never gathered whole); as is for other leaves."""
  sharding = getattr(x, "sharding", None)
  if _is_traced(x) or not isinstance(sharding, jax.sharding.NamedSharding):
    return take_units(x, perm, ref)
  return jax.jit(take_units, static_argnums=2, out_shardings=sharding)(x, perm, ref)


def identity_permutation(spec: spec_lib.PermutationSpec) -> Perm:
  """`{group: arange(n)}` (`[L, n]`, every row arange(n), for a batched group): changes nothing."""
  return {g: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), _shape(spec, g)) for g, n in spec.sizes.items()}


def _shape(spec: spec_lib.PermutationSpec, g: str) -> tuple[int, ...]:
  n = spec.sizes[g]
  return (n,) if g not in spec.batch_sizes else (spec.batch_sizes[g], n)


def invert_permutation(perm: Mapping[str, Any]) -> Perm:
  """The permutation that undoes `perm`, group by group.

  `invert(p)[g][p[g][i]] == i`, so `apply(invert(p), apply(p, v)) == v` and
  `apply(p, apply(invert(p), v)) == v`. Jittable.

  Args:
    perm: group -> int[n], a permutation of range(n) (or int[L, n], one per row).

  Returns:
    group -> int32 of the same shape.
  """
  return {g: jnp.argsort(jnp.asarray(p), axis=-1).astype(jnp.int32) for g, p in perm.items()}


def compose_permutations(first: Mapping[str, Any], second: Mapping[str, Any]) -> Perm:
  """The permutation that applies `first`, then `second`.

  `compose(p, q)[g] == p[g][q[g]]` (row by row for a batched group's
  int[L, n]), so for any spec and variables
  `apply(compose(p, q), v) == apply(q, apply(p, v))`. (Gathers compose in
  this order: unit i after both is unit `q[i]` after `p`, which is unit
  `p[q[i]]` of `v`.) Jittable.

  Args:
    first, second: group -> int[n] (or int[L, n]), over the same groups and shapes.

  Returns:
    group -> int32 of the same shape, in `first`'s group order.

  Raises:
    ValueError: naming the groups or the group whose sizes differ.
  """
  if set(first) != set(second):
    raise ValueError(f"compose: the permutations' groups differ: {sorted(set(first) ^ set(second))}")
  for g in first:
    if np.shape(first[g]) != np.shape(second[g]):
      raise ValueError(
          f"compose: group {g!r} has shape {np.shape(first[g])} in the first permutation and"
          f" {np.shape(second[g])} in the second"
      )
  return {g: jnp.take_along_axis(jnp.asarray(first[g]), jnp.asarray(second[g]), axis=-1).astype(jnp.int32)
          for g in first}


def random_permutation(spec: spec_lib.PermutationSpec, key: jax.Array) -> Perm:
  """One uniformly random permutation per group, deterministic given `key`.

  Args:
    spec: the groups and their sizes.
    key: a `jax.random` key; group i (in `spec.groups` order) uses the i-th
      key of `jax.random.split(key, len(groups))`; a batched group's row l
      the l-th key of that key split in L.

  Returns:
    group -> int32[n] (int32[L, n] for a batched group).
  """
  keys = jax.random.split(key, max(len(spec.sizes), 1))
  out = {}
  for k, (g, n) in zip(keys, spec.sizes.items()):
    if g in spec.batch_sizes:
      rows = [jax.random.permutation(c, n) for c in jax.random.split(k, spec.batch_sizes[g])]
      out[g] = jnp.stack(rows).astype(jnp.int32)
    else:
      out[g] = jax.random.permutation(k, n).astype(jnp.int32)
  return out
