"""Pytree arithmetic and validation.

Arithmetic works leaf by leaf on any pytree of arrays (a Flax variables dict, an
NNX state, a tuple of arrays) and keeps each leaf's dtype. Validation raises a
`ValueError` that names the first offending leaf by its key path, written with
`/` between keys (`params/Dense_1/kernel`), so a mismatch is found before any
expensive work starts rather than deep inside a `jax.tree.map`.

This module imports nothing else of mergejax.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def key_name(key: Any) -> str:
  """One key of a key path as text: dict key, attribute name or index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """A key path as `a/b/c`; the root is `<root>`."""
  return "/".join(key_name(k) for k in path) or "<root>"


def key_path(path: Sequence[Any]) -> tuple[str, ...]:
  """A key path as a tuple of key names, as `AxisRef.path` holds it."""
  return tuple(key_name(k) for k in path)


def leaves_by_path(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """`{key_path: leaf}` in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {key_path(p): leaf for p, leaf in flat}


def replace_leaves(tree: PyTree, updates: Mapping[tuple[str, ...], Any]) -> PyTree:
  """`tree` with the leaves at the key paths of `updates` replaced."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(treedef, [updates.get(key_path(p), leaf) for p, leaf in flat])


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """`[(path_str, leaf), ...]` in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat]


def check_same_structure(*trees: PyTree) -> None:
  """Raises ValueError unless all trees have the same structure.

  The message names the first leaf path (in flattening order) where a tree
  differs from the first one, e.g. `params/Dense_1/bias: in tree 0, not in
  tree 1`.
  """
  if len(trees) < 2:
    return
  ref_def = jax.tree_util.tree_structure(trees[0])
  ref_paths = [p for p, _ in leaves_with_paths(trees[0])]
  for i, tree in enumerate(trees[1:], start=1):
    if jax.tree_util.tree_structure(tree) == ref_def:
      continue
    paths = [p for p, _ in leaves_with_paths(tree)]
    for j in range(max(len(ref_paths), len(paths))):
      a = ref_paths[j] if j < len(ref_paths) else None
      b = paths[j] if j < len(paths) else None
      if a == b:
        continue
      if a is not None and a not in paths:
        raise ValueError(f"{a}: in tree 0, not in tree {i}")
      if b is not None and b not in ref_paths:
        raise ValueError(f"{b}: in tree {i}, not in tree 0")
      raise ValueError(
          f"{a}: leaves in a different order in tree 0 and tree {i}"
      )
    raise ValueError(
        f"trees 0 and {i} have the same leaf paths but different containers:"
        f" {ref_def} vs {jax.tree_util.tree_structure(tree)}"
    )


def check_same_shapes(*trees: PyTree, dtypes: bool = False) -> None:
  """Raises ValueError unless the trees match in structure and leaf shapes.

  Args:
    *trees: pytrees of arrays (or `jax.ShapeDtypeStruct`s).
    dtypes: also require equal dtypes.

  The message names the first differing leaf, e.g.
  `params/Dense_1/kernel: (64, 10) vs (64, 12)`.
  """
  check_same_structure(*trees)
  if len(trees) < 2:
    return
  ref = leaves_with_paths(trees[0])
  for i, tree in enumerate(trees[1:], start=1):
    for (path, a), (_, b) in zip(ref, leaves_with_paths(tree)):
      if np.shape(a) != np.shape(b):
        raise ValueError(
            f"{path}: {tuple(np.shape(a))} vs {tuple(np.shape(b))}"
            f" (tree 0 vs tree {i})"
        )
      if dtypes and jnp.result_type(a) != jnp.result_type(b):
        raise ValueError(
            f"{path}: dtype {jnp.result_type(a)} vs {jnp.result_type(b)}"
            f" (tree 0 vs tree {i})"
        )


def in_host_memory(x: Any) -> bool:
  """Whether `x` is a concrete array whose data is in this host's memory: a NumPy array, or a jax.Array on
  one CPU device (`np.asarray` reads it without a copy; NumPy works on it without compiling a program)."""
  if isinstance(x, np.ndarray):
    return True
  return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
          and isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
          and next(iter(x.devices())).platform == "cpu")


@jax.jit
def _leaf_is_finite(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def check_finite(tree: PyTree, name: str = "tree") -> None:
  """Raises ValueError naming the first floating leaf with NaN or Inf.

  Leaves in host memory (`in_host_memory`) are checked by NumPy, the others
  in one device call; the counts in the message are computed only when a
  leaf fails. Integer and boolean leaves are always finite.
  """
  floating = {
      p: x
      for p, x in leaves_with_paths(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  }
  on_device = {p: x for p, x in floating.items() if not in_host_memory(x)}
  ok = {**{p: bool(np.isfinite(np.asarray(x)).all()) for p, x in floating.items() if p not in on_device},
        **(jax.device_get(_leaf_is_finite(on_device)) if on_device else {})}
  for path in floating:
    if not ok[path]:
      x = np.asarray(jax.device_get(floating[path]))
      raise ValueError(
          f"{name}: {path} has {int(np.isnan(x).sum())} NaN and"
          f" {int(np.isinf(x).sum())} Inf values (of {x.size})"
      )


def add(a: PyTree, b: PyTree) -> PyTree:
  """a + b, leaf by leaf."""
  check_same_shapes(a, b)
  return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
  """a - b, leaf by leaf (a task vector when b is the base model)."""
  check_same_shapes(a, b)
  return jax.tree.map(jnp.subtract, a, b)


def scale(tree: PyTree, s: jax.typing.ArrayLike) -> PyTree:
  """s * tree, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: (s * x).astype(x.dtype), tree)


def lerp(a: PyTree, b: PyTree, t: jax.typing.ArrayLike) -> PyTree:
  """(1 - t) a + t b, keeping each leaf's dtype; t = 0 gives a, t = 1 gives b."""
  check_same_shapes(a, b)
  return jax.tree.map(lambda x, y: (x + t * (y - x)).astype(x.dtype), a, b)


def weighted_sum(
    trees: Sequence[PyTree], weights: Sequence[float] | jax.Array
) -> PyTree:
  """sum_i weights[i] * trees[i], leaf by leaf, keeping each leaf's dtype.

  Args:
    trees: N pytrees of the same structure and shapes.
    weights: f32[N]. Not normalised: pass weights summing to 1 for an average.
  """
  trees = list(trees)
  if not trees:
    raise ValueError("weighted_sum needs at least one tree")
  if len(weights) != len(trees):
    raise ValueError(f"{len(trees)} trees but {len(weights)} weights")
  check_same_shapes(*trees)

  def leaf_sum(*xs):
    total = functools.reduce(
        jnp.add, (w * x.astype(jnp.float32) for w, x in zip(weights, xs))
    )
    return total.astype(xs[0].dtype)

  return jax.tree.map(leaf_sum, *trees)


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """sum over leaves of <a_leaf, b_leaf>, in float32 at full precision."""
  check_same_shapes(a, b)
  terms = jax.tree.leaves(
      jax.tree.map(
          lambda x, y: jnp.vdot(
              x.ravel().astype(jnp.float32),
              y.ravel().astype(jnp.float32),
              precision=jax.lax.Precision.HIGHEST,
          ),
          a,
          b,
      )
  )
  return functools.reduce(jnp.add, terms, jnp.zeros((), jnp.float32))


def global_norm(tree: PyTree) -> jax.Array:
  """sqrt(sum of squares of every entry of every leaf), in float32."""
  terms = [
      jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)
  ]
  return jnp.sqrt(functools.reduce(jnp.add, terms, jnp.zeros((), jnp.float32)))


def num_params(tree: PyTree) -> int:
  """Total number of entries over all leaves (works on ShapeDtypeStructs)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))
