"""Applying, inverting and composing permutations over whole variable trees.

    perm = random_permutation(spec, key)             # {group: int32[n]}
    permuted = apply_permutation(spec, perm, variables)
    apply_permutation(spec, invert_permutation(perm), permuted)   # == variables

Permutations are gathers (DESIGN.md): for every AxisRef of group g,
`take(leaf, perm[g], axis)` (for a factored axis, along its component of the
view), so B's unit `perm[g][i]` lands on A's unit i.
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


def take_units(x: jax.Array, perm: jax.Array, ref: spec_lib.AxisRef) -> jax.Array:
  """`x` with the units of `ref`'s axis (or axis component) gathered by `perm`."""
  if ref.factor is None:
    return jnp.take(x, perm, axis=ref.axis)
  view, index = ref.factor
  shape = x.shape
  x = jnp.reshape(x, shape[:ref.axis] + tuple(view) + shape[ref.axis + 1:])
  return jnp.reshape(jnp.take(x, perm, axis=ref.axis + index), shape)


def check_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any]) -> None:
  """Raises ValueError unless `perm` holds one permutation per group of `spec`.

  Values are checked when they are concrete; traced ones (under jit) only by
  shape and dtype.
  """
  missing, unknown = sorted(set(spec.groups) - set(perm)), sorted(set(perm) - set(spec.groups))
  if missing or unknown:
    raise ValueError(f"permutation: missing groups {missing}, unknown groups {unknown}")
  for g, p in perm.items():
    n = spec.sizes[g]
    if tuple(jnp.shape(p)) != (n,) or not jnp.issubdtype(jnp.result_type(p), jnp.integer):
      raise ValueError(f"permutation of group {g!r}: expected int[{n}], got {jnp.result_type(p)}{list(jnp.shape(p))}")
    if not isinstance(p, jax.core.Tracer) and not np.array_equal(np.sort(np.asarray(p)), np.arange(n)):
      raise ValueError(f"permutation of group {g!r} is not a permutation of range({n})")


def apply_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any], variables: PyTree) -> PyTree:
  """`variables` with every group's axes gathered by `perm[group]`.

  Args:
    spec: the groups; it must fit `variables` (`spec.check_spec`).
    perm: group -> int[n], a permutation of range(n).
    variables: the tree to permute (any leaves; dtypes are kept).

  Returns:
    A tree of the same structure; leaves no group touches are the same objects.
  """
  spec_lib.check_spec(spec, variables)
  check_permutation(spec, perm)
  leaves = tree.leaves_by_path(variables)
  updates = {}
  for g, refs in spec.groups.items():
    for ref in refs:
      updates[ref.path] = take_units(updates.get(ref.path, leaves[ref.path]), perm[g], ref)
  return tree.replace_leaves(variables, updates)


def identity_permutation(spec: spec_lib.PermutationSpec) -> Perm:
  return {g: jnp.arange(n, dtype=jnp.int32) for g, n in spec.sizes.items()}


def invert_permutation(perm: Mapping[str, Any]) -> Perm:
  """The permutation that undoes `perm`: `apply(invert(p), apply(p, v)) == v`."""
  return {g: jnp.argsort(jnp.asarray(p)).astype(jnp.int32) for g, p in perm.items()}


def compose_permutations(first: Mapping[str, Any], second: Mapping[str, Any]) -> Perm:
  """Applying `first`, then `second`: `apply(compose(p, q), v) == apply(q, apply(p, v))`."""
  if set(first) != set(second):
    raise ValueError(f"compose: groups differ: {sorted(set(first) ^ set(second))}")
  return {g: jnp.asarray(first[g])[jnp.asarray(second[g])].astype(jnp.int32) for g in first}


def random_permutation(spec: spec_lib.PermutationSpec, key: jax.Array) -> Perm:
  """One uniformly random permutation per group, deterministic given `key`."""
  keys = jax.random.split(key, max(len(spec.sizes), 1))
  return {g: jax.random.permutation(k, n).astype(jnp.int32) for k, (g, n) in zip(keys, spec.sizes.items())}
