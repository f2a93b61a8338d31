"""Task vectors: task arithmetic, TIES and DARE over models that share a base.

A fine-tuned model's task vector is `tau_i = models[i] - base`. The merges
add a combination of task vectors back onto the base:

    merged = mj.merge.task_arithmetic(base, [v1, v2], scale=0.3)
    merged = mj.merge.ties(base, [v1, v2], density=0.2)
    merged = mj.merge.dare(base, [v1, v2], drop=0.9, key=key)
    merged = mj.merge.dare_ties(base, [v1, v2], drop=0.9, density=0.2, key=key)

- Task arithmetic (Ilharco et al. 2023): `base + sum_i scale_i tau_i`.
- TIES (Yadav et al. 2023): trim each tau_i to its largest-magnitude entries,
  elect a sign per entry (the sign of the sum of the trimmed vectors), and
  average, entry by entry, the trimmed values of the models that agree with
  it (0 where none does): `base + scale * merged`.
- DARE (Yu et al. 2024): drop each entry of tau_i with probability `drop` and
  rescale the survivors by 1 / (1 - drop), then task arithmetic (`dare`) or
  TIES (`dare_ties`).

Task vectors are computed in float32 (or wider) and every merged leaf keeps
the base's dtype. Each function checks its arguments before any work and runs
as one jit-compiled function over the whole tree.

The parts an out-of-core merge needs are public, so that a merge that sees one
leaf at a time (a dict nested along the leaf's path) reproduces the in-memory
one exactly: `keep_count` (TIES's k), `ties_thresholds` (the global trim's
first pass, passed back as `thresholds=`) and `leaf_key` (DARE's random key
of one leaf).
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree

PyTree = Any

TRIMS = ("tensor", "global")


def keep_count(density: float, size: int) -> int:
  """TIES's k: how many of `size` entries a trim at `density` keeps.

  k = ceil(density * size), ignoring float error below 1e-6 (so 0.7 of 10
  entries is 7, not the 8 that ceil(0.7 * 10) = ceil(7.000000000000001)
  gives); at least 1 of a non-empty leaf.
  """
  return min(size, max(1, math.ceil(density * size - 1e-6)))


def _path_hash(path: Sequence[Any]) -> np.uint32:
  """crc32 of the leaf's path as `a/b/c`: what `leaf_key` folds in."""
  return np.uint32(zlib.crc32(tree.path_str(path).encode()))


def leaf_key(key: jax.Array, model_index: int, path: Sequence[Any]) -> jax.Array:
  """The random key of DARE's drop mask for one leaf of one model.

  `fold_in(fold_in(key, model_index), crc32(path_str(path)))`: it depends on
  the leaf's path, not on its position in the tree, so a merge that sees one
  leaf at a time, wrapped in dicts nested along the same path, draws the same
  mask.

  Args:
    key: the merge's key.
    model_index: i, the model's index in `models`.
    path: the leaf's key path (JAX path entries or plain key names).
  """
  return jax.random.fold_in(jax.random.fold_in(key, model_index), _path_hash(path))


def _check_models(base: PyTree, models: Sequence[PyTree]) -> list[PyTree]:
  """The models as a list, after checking there is one and all match the base."""
  models = list(models)
  if not models:
    raise ValueError("models: need at least one model")
  for i, model in enumerate(models):
    try:
      tree.check_same_shapes(base, model)
    except ValueError as e:
      raise ValueError(f"models[{i}] does not match the base: {e}") from None
  return models


def _check_scale(scale: float) -> float:
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return float(scale)


def _model_scales(scale: float | Sequence[float], num: int) -> np.ndarray:
  """f32[N]: one scale per model, from a float or a sequence of N floats."""
  scales = np.asarray(scale, np.float64)
  if scales.ndim == 0:
    scales = np.full(num, scales)
  if scales.shape != (num,):
    raise ValueError(f"scale: {num} models but {scales.size} scales")
  if not np.all(np.isfinite(scales)):
    raise ValueError(f"scale must be finite, got {scales.tolist()}")
  return scales.astype(np.float32)


def _check_density(density: float) -> float:
  if not 0 < density <= 1:
    raise ValueError(f"density must be in (0, 1], got {density}")
  return float(density)


def _keep_probability(drop: float, key: jax.Array | None) -> float:
  """1 - drop, after checking that drop is in [0, 1) and has a key."""
  if not 0 <= drop < 1:
    raise ValueError(f"drop must be in [0, 1), got {drop}")
  if key is None:
    raise ValueError("DARE needs a random key; got key=None")
  return 1.0 - float(drop)


def _check_trim(trim: str, thresholds: Sequence[float] | None, num: int) -> None:
  if trim not in TRIMS:
    raise ValueError(f"trim must be one of {TRIMS}, got {trim!r}")
  if thresholds is None:
    return
  if trim != "global":
    raise ValueError("thresholds are the global trim's; pass trim='global'")
  t = np.asarray(thresholds, np.float64)
  if t.shape != (num,):
    raise ValueError(f"thresholds: {num} models but thresholds of shape {t.shape}")
  if not np.all(np.isfinite(t) & (t >= 0)):
    raise ValueError(f"thresholds must be finite and >= 0, got {t.tolist()}")


def _delta(x: jax.Array, b: jax.Array) -> jax.Array:
  """x - b in float32, or wider where b is."""
  dtype = jnp.promote_types(jnp.result_type(b), jnp.float32)
  return x.astype(dtype) - b.astype(dtype)


def _leaf_task_vectors(
    b: jax.Array, xs: Sequence[jax.Array], keys: jax.Array | None, keep: float
) -> jax.Array:
  """f32[N, *b.shape]: each model's task vector at one leaf.

  With keys (key[N], the models' `leaf_key`s of this leaf), DARE's: model i
  keeps an entry where `jax.random.bernoulli(keys[i], keep, b.shape)`,
  divided by `keep`, and is 0 elsewhere.
  """
  taus = jnp.stack([_delta(x, b) for x in xs])
  if keys is None:
    return taus
  kept = jax.vmap(lambda k: jax.random.bernoulli(k, keep, b.shape))(keys)
  return jnp.where(kept, taus / keep, 0)


@functools.partial(jax.jit, static_argnums=1)
def _leaf_keys(key: jax.Array, num: int, path_hashes: jax.Array) -> jax.Array:
  """key[L, N]: `leaf_key(key, i, path)` of every leaf and model, in one call.

  Args:
    key: the merge's key.
    num: N, a static count of models.
    path_hashes: uint32[L], `_path_hash` of each leaf's path.
  """
  def leaf(path_hash):
    return jax.vmap(
        lambda i: jax.random.fold_in(jax.random.fold_in(key, i), path_hash)
    )(jnp.arange(num))

  return jax.vmap(leaf)(path_hashes)


def _rebase(b: jax.Array, merged: jax.Array) -> jax.Array:
  """b + merged, in b's dtype."""
  return (b.astype(merged.dtype) + merged).astype(jnp.result_type(b))


def _per_model(values: jax.Array, ndim: int) -> jax.Array:
  """f32[N] reshaped to broadcast against f32[N, *shape] of `ndim` axes."""
  return values.reshape((-1,) + (1,) * ndim)


def _map_leaves(
    fn: Callable[[jax.Array, list[jax.Array], jax.Array | None], jax.Array],
    base: PyTree,
    models: list[PyTree],
    key: jax.Array | None,
) -> PyTree:
  """`fn(b, xs, keys)` for each leaf of the base, in the base's structure.

  `keys` are the models' DARE keys of the leaf (key[N], `leaf_key`), all
  derived in one call; None without a key. `fn` is jit-compiled per leaf
  shape, so the many layers of one shape in a deep model share a compilation
  (and the random bits one generator).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(base)
  model_leaves = [treedef.flatten_up_to(m) for m in models]
  if key is None:
    keys = [None] * len(flat)
  else:
    hashes = np.array([_path_hash(path) for path, _ in flat], np.uint32)
    keys = list(_leaf_keys(key, len(models), hashes))
  return treedef.unflatten([
      fn(b, [leaves[j] for leaves in model_leaves], keys[j])
      for j, (_, b) in enumerate(flat)
  ])


@jax.jit
def _task_arithmetic_leaf(b, xs, keys, scales, keep):
  """b + sum_i scales[i] tau_i at one leaf; scales: f32[N]."""
  taus = _leaf_task_vectors(b, xs, keys, keep)
  return _rebase(b, jnp.sum(_per_model(scales, b.ndim) * taus, axis=0))


def _task_arithmetic(
    base: PyTree,
    models: list[PyTree],
    scales: np.ndarray,
    key: jax.Array | None,
    keep: float,
) -> PyTree:
  """base + sum_i scales[i] tau_i (DARE-dropped with a key); scales: f32[N]."""
  scales = jnp.asarray(scales)
  return _map_leaves(
      lambda b, xs, keys: _task_arithmetic_leaf(b, xs, keys, scales, keep),
      base, models, key,
  )


def _kth_largest(values: jax.Array, k: jax.Array) -> jax.Array:
  """f32[N]: the k-th largest entry of each row of values: f32[N, size]."""
  if values.shape[1] == 0:  # An empty leaf: nothing to trim.
    return jnp.zeros(values.shape[:1], values.dtype)
  return jnp.sort(values, axis=1)[:, values.shape[1] - k]


def _disjoint_merge(trimmed: jax.Array) -> jax.Array:
  """TIES's elect and disjoint mean over trimmed: f32[N, *shape].

  The elected sign of an entry is the sign of the sum of the models' trimmed
  values; the result is the mean of the non-zero values with that sign, and
  0 where there is none (also where the sum is 0).
  """
  elected = jnp.sign(jnp.sum(trimmed, axis=0))
  agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
  count = jnp.sum(agree, axis=0)
  total = jnp.sum(jnp.where(agree, trimmed, 0), axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0)


def _trim_and_merge(b, taus, thresholds, scale):
  """b + scale * the disjoint merge of the taus trimmed at f32[N] thresholds."""
  trimmed = jnp.where(jnp.abs(taus) >= _per_model(thresholds, b.ndim), taus, 0)
  return _rebase(b, scale * _disjoint_merge(trimmed))


@jax.jit
def _ties_leaf_tensor(b, xs, keys, k, scale, keep):
  """TIES at one leaf, each model keeping its k largest |tau_i| (and ties)."""
  taus = _leaf_task_vectors(b, xs, keys, keep)
  thresholds = _kth_largest(jnp.abs(taus).reshape(len(xs), -1), k)
  return _trim_and_merge(b, taus, thresholds, scale)


@jax.jit
def _ties_leaf_global(b, xs, keys, thresholds, scale, keep):
  """TIES at one leaf, each model trimmed at its threshold: f32[N]."""
  taus = _leaf_task_vectors(b, xs, keys, keep)
  return _trim_and_merge(b, taus, thresholds, scale)


@jax.jit
def _leaf_magnitudes(b, xs, keys, keep):
  """f32[N, b.size]: |tau_i| at one leaf, flattened."""
  return jnp.abs(_leaf_task_vectors(b, xs, keys, keep)).reshape(len(xs), -1)


_kth_largest_jit = jax.jit(_kth_largest)


def _global_thresholds(
    base: PyTree,
    models: list[PyTree],
    k: int,
    key: jax.Array | None,
    keep: float,
) -> jax.Array:
  """f32[N]: each model's k-th largest |tau_i| over all its leaves."""
  magnitudes = _map_leaves(
      lambda b, xs, keys: _leaf_magnitudes(b, xs, keys, keep), base, models, key
  )
  return _kth_largest_jit(jnp.concatenate(jax.tree.leaves(magnitudes), axis=1), k)


def task_vector(base: PyTree, tuned: PyTree) -> PyTree:
  """tuned - base, leaf by leaf (in the promoted dtype of each pair of leaves).

  Raises:
    ValueError: the trees differ in structure or in a leaf's shape (the
      message names the leaf's path).
  """
  _check_models(base, [tuned])
  return _subtract(tuned, base)


_subtract = jax.jit(tree.sub)


def task_arithmetic(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    scale: float | Sequence[float] = 1.0,
) -> PyTree:
  """Task arithmetic: base + sum_i scale_i (models[i] - base).

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    scale: one float for every model, or N floats, one per model (a negative
      scale subtracts a task).

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), or a wrong number of scales or a non-finite one.
  """
  models = _check_models(base, models)
  scales = _model_scales(scale, len(models))
  return _task_arithmetic(base, models, scales, None, 1.0)


def ties_thresholds(
    base: PyTree,
    models: Sequence[PyTree],
    density: float,
    *,
    drop: float = 0.0,
    key: jax.Array | None = None,
) -> list[float]:
  """Each model's global TIES threshold: the k-th largest |tau_i| entry.

  k = `keep_count(density, n)` where n is the number of entries of the whole
  model. The global trim keeps the entries of tau_i with |tau_i| >= its
  threshold (k of them, and every tie with the k-th). An out-of-core merge
  computes these in a first pass and passes them to `ties` or `dare_ties` as
  `thresholds=`.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it.
    density: the fraction of entries to keep, in (0, 1].
    drop: with `key`, the thresholds of DARE's dropped and rescaled task
      vectors, as `dare_ties` trims them.
    key: DARE's key (required when drop > 0).

  Returns:
    N thresholds, one per model.

  Raises:
    ValueError: no model, mismatched trees, density outside (0, 1], drop
      outside [0, 1), or drop > 0 without a key.
  """
  models = _check_models(base, models)
  density = _check_density(density)
  keep = 1.0 if key is None and drop == 0 else _keep_probability(drop, key)
  k = keep_count(density, tree.num_params(base))
  thresholds = _global_thresholds(base, models, k, key, keep)
  return [float(t) for t in jax.device_get(thresholds)]


def _ties_with_trim(
    base: PyTree,
    models: list[PyTree],
    density: float,
    scale: float,
    trim: str,
    thresholds: Sequence[float] | None,
    key: jax.Array | None,
    keep: float,
) -> PyTree:
  """TIES (over DARE-dropped task vectors, with a key), leaf by leaf."""
  if trim == "tensor":
    return _map_leaves(
        lambda b, xs, keys: _ties_leaf_tensor(
            b, xs, keys, keep_count(density, np.size(b)), scale, keep),
        base, models, key,
    )
  if thresholds is None:
    k = keep_count(density, tree.num_params(base))
    thresholds = _global_thresholds(base, models, k, key, keep)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  return _map_leaves(
      lambda b, xs, keys: _ties_leaf_global(b, xs, keys, thresholds, scale, keep),
      base, models, key,
  )


def ties(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
) -> PyTree:
  """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

  1. Trim: each tau_i = models[i] - base keeps its entries with |tau_i| >= a
     threshold, the k-th largest |tau_i|, with k = `keep_count(density,
     size)`: per leaf (`trim="tensor"`, size = the leaf's entries) or over all
     leaves of model i (`trim="global"`, size = the model's entries). Entries
     tied in magnitude with the k-th are all kept, so a trim may keep more
     than k.
  2. Elect: the sign of each entry is the sign of the sum over models of the
     trimmed tau_i.
  3. Disjoint merge: each entry is the mean over the models whose trimmed
     entry is non-zero and has the elected sign; 0 where no model does.

  The result is base + scale * merged. With density 1 a single model (or N
  copies of one) comes back unchanged at scale 1.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    density: the fraction of each task vector's entries to keep, in (0, 1].
    scale: lambda, the factor on the merged task vector.
    trim: "tensor" or "global".
    thresholds: with `trim="global"`, model i's threshold given explicitly
      (as `ties_thresholds` computes it, which is what happens when None; an
      out-of-core merge passes it after a first pass). `density` is then
      unused.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), density outside (0, 1], an unknown trim, thresholds with
      the tensor trim, or thresholds of the wrong count, negative or
      non-finite.
  """
  models = _check_models(base, models)
  density = _check_density(density)
  scale = _check_scale(scale)
  _check_trim(trim, thresholds, len(models))
  return _ties_with_trim(base, models, density, scale, trim, thresholds, None, 1.0)


def dare(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    drop: float,
    key: jax.Array,
    scale: float | Sequence[float] = 1.0,
) -> PyTree:
  """DARE (Yu et al. 2024): drop and rescale task vectors, then add them.

  Each entry of tau_i = models[i] - base is kept with probability 1 - drop
  and divided by it, else set to 0; the mask of the leaf at path p of model i
  is `jax.random.bernoulli(leaf_key(key, i, p), 1 - drop, shape)`. The result
  is base + sum_i scale_i * dropped tau_i (task arithmetic), so drop 0 is
  task arithmetic.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    drop: the drop probability, in [0, 1).
    key: a JAX random key; the same key gives the same merge.
    scale: one float for every model, or N floats, one per model.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), drop outside [0, 1), or a wrong number of scales or a
      non-finite one.
  """
  models = _check_models(base, models)
  keep = _keep_probability(drop, key)
  scales = _model_scales(scale, len(models))
  return _task_arithmetic(base, models, scales, key, keep)


def dare_ties(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    drop: float,
    density: float,
    key: jax.Array,
    scale: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
) -> PyTree:
  """DARE's drop and rescale (see `dare`), then TIES (see `ties`).

  The trim, its thresholds included, works on the dropped and rescaled task
  vectors (`ties_thresholds(..., drop=drop, key=key)` computes those of the
  global trim). Drop 0 is `ties`.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    drop: the drop probability, in [0, 1).
    density: the fraction of each dropped task vector's entries to keep, in
      (0, 1].
    key: a JAX random key; the same key gives the same merge.
    scale: lambda, the factor on the merged task vector.
    trim: "tensor" or "global".
    thresholds: with `trim="global"`, model i's threshold given explicitly.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: as `ties` and `dare`.
  """
  models = _check_models(base, models)
  keep = _keep_probability(drop, key)
  density = _check_density(density)
  scale = _check_scale(scale)
  _check_trim(trim, thresholds, len(models))
  return _ties_with_trim(base, models, density, scale, trim, thresholds, key, keep)
