"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging", 2022).

Each entry of the merged model is the mean of the models' entries weighted by
their diagonal Fisher information, so each model dominates where it is
confident:

    merged = sum_i w_i F_i theta_i / sum_i w_i F_i      (entry by entry)

with every F_i floored at `epsilon`. Equal Fishers give the plain weighted
average. Models trained from different initialisations are aligned first, and
a Fisher is permuted like its model:

    Fa = mj.fisher(logits_fn, va, batches)
    Fb = mj.fisher(logits_fn, vb, batches)
    res = mj.weight_matching(spec, va, vb, key=key)
    vb_aligned = mj.apply_permutation(spec, res.perm, vb)
    Fb_aligned = mj.apply_permutation(spec, res.perm, Fb)
    merged = mj.merge.fisher([va, vb_aligned], [Fa, Fb_aligned])

`mj.fisher` gives 0 to non-differentiated leaves (BatchNorm running
statistics); the floor makes those the plain weighted average.
"""

from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree
from mergejax.merge.average import check_models
from mergejax.merge.average import normalized_weights

PyTree = Any


@jax.jit
def _leaf_minima(trees: list[PyTree]) -> list[PyTree]:
  """min(0, every entry) of each leaf."""
  return jax.tree.map(lambda x: jnp.min(x, initial=0), trees)


def _check_fishers(models: list[PyTree], fishers: Sequence[PyTree]) -> list[PyTree]:
  """The Fishers as a list, after checking they match the models and are
  finite and non-negative (errors name the first offending leaf)."""
  fishers = list(fishers)
  if len(fishers) != len(models):
    raise ValueError(f"{len(models)} models but {len(fishers)} fishers")
  for i, (model, f) in enumerate(zip(models, fishers)):
    try:
      tree.check_same_shapes(model, f)
    except ValueError as e:
      raise ValueError(f"fishers[{i}] does not match models[{i}]: {e}") from None
  for i, f in enumerate(fishers):
    tree.check_finite(f, f"fishers[{i}]")
  minima = jax.device_get(_leaf_minima(fishers))
  for i, leaf_minima in enumerate(minima):
    for path, low in tree.leaves_with_paths(leaf_minima):
      if low < 0:
        raise ValueError(
            f"fishers[{i}]: {path} has negative entries (min {low}); a Fisher"
            " is a mean of squares"
        )
  return fishers


@jax.jit
def _fisher_merge(
    models: list[PyTree],
    fishers: list[PyTree],
    weights: jax.Array,
    epsilon: jax.Array,
) -> PyTree:
  def leaf(*leaves):
    thetas, fs = leaves[: len(models)], leaves[len(models):]
    dtype = jnp.promote_types(jnp.result_type(thetas[0]), jnp.float32)
    numerator = jnp.zeros(jnp.shape(thetas[0]), dtype)
    denominator = jnp.zeros(jnp.shape(thetas[0]), dtype)
    for w, theta, f in zip(weights, thetas, fs):
      wf = w * jnp.maximum(f.astype(dtype), epsilon)
      numerator += wf * theta.astype(dtype)
      denominator += wf
    return (numerator / denominator).astype(jnp.result_type(thetas[0]))

  return jax.tree.map(leaf, *models, *fishers)


def fisher(
    models: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-8,
) -> PyTree:
  """Fisher-weighted average: sum_i w_i F_i theta_i / sum_i w_i F_i.

  Entry by entry, with F_i = max(fishers[i], epsilon). See the module
  docstring for aligning models of different initialisations first.

  Args:
    models: N >= 1 models theta_i of the same structure and leaf shapes.
    fishers: N diagonal Fishers F_i, each shaped like its model
      (`mj.fisher`), finite and non-negative.
    weights: N non-negative model weights w_i, not all zero; uniform when
      None (only their ratios matter).
    epsilon: the floor on every Fisher entry, > 0; where all Fishers are
      below it the result is the weighted average.

  Returns:
    The merged model, in the leaf dtypes of `models[0]`.

  Raises:
    ValueError: no model, mismatched models or Fishers (naming the leaf
      path), a Fisher leaf with NaN, Inf or negative entries (naming the
      path), bad weights, or epsilon <= 0.
  """
  models = check_models(models)
  w = normalized_weights(weights, len(models))
  if not 0 < epsilon < math.inf:
    raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
  fishers = _check_fishers(models, fishers)
  return _fisher_merge(models, fishers, jnp.asarray(w), epsilon)
