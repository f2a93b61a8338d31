"""Weight averaging and model soups (Wortsman et al. 2022).

Models that share an architecture and a region of weight space (fine-tuned
from one base, or aligned by permutation first) are averaged leaf by leaf:

    merged = mj.merge.average([va, vb, vc], weights=[2, 1, 1])
    soup = mj.merge.uniform_soup(finetuned)
    soup, chosen = mj.merge.greedy_soup(finetuned, eval_fn)

Arithmetic is in float32 and every merged leaf keeps the dtype of the first
model's leaf.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree

PyTree = Any

_weighted_sum = jax.jit(tree.weighted_sum)


def check_models(models: Sequence[PyTree]) -> list[PyTree]:
  """The models as a list, after checking there is one and all match.

  Raises:
    ValueError: no model, or two models that differ in structure or in the
      shape of a leaf (the message names the leaf's path).
  """
  models = list(models)
  if not models:
    raise ValueError("models: need at least one model")
  try:
    tree.check_same_shapes(*models)
  except ValueError as e:
    raise ValueError(f"models (tree i is models[i]): {e}") from None
  return models


def normalized_weights(weights: Sequence[float] | None, num: int) -> np.ndarray:
  """Non-negative weights scaled to sum to 1; uniform when `weights` is None.

  Args:
    weights: N finite non-negative weights, not all zero, or None.
    num: the number of models, N.

  Returns:
    f32[N], summing to 1.

  Raises:
    ValueError: a count other than `num`, or a negative, non-finite or
      all-zero weight.
  """
  if weights is None:
    return np.full(num, 1.0 / num, np.float32)
  w = np.asarray(weights, np.float64)
  if w.shape != (num,):
    raise ValueError(f"weights: {num} models but weights of shape {w.shape}")
  if not np.all(np.isfinite(w)):
    raise ValueError(f"weights must be finite, got {w.tolist()}")
  if np.any(w < 0):
    raise ValueError(f"weights must be non-negative, got {w.tolist()}")
  if not np.any(w > 0):
    raise ValueError("weights are all zero")
  return (w / w.sum()).astype(np.float32)


def average(
    models: Sequence[PyTree], weights: Sequence[float] | None = None
) -> PyTree:
  """sum_i w_i models[i] with the weights normalised to sum to 1.

  Args:
    models: N >= 1 pytrees of the same structure and leaf shapes.
    weights: N non-negative weights, not all zero; uniform when None.

  Returns:
    The weighted mean, a pytree like `models[0]` (same leaf dtypes).

  Raises:
    ValueError: no model, mismatched trees (naming the leaf path), or bad
      weights (see `normalized_weights`).
  """
  models = check_models(models)
  w = normalized_weights(weights, len(models))
  return _weighted_sum(models, jnp.asarray(w))


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
  """The uniform soup: the plain mean of all ingredients (`average`)."""
  return average(models)


@jax.jit
def _soup_mean(total: PyTree, count: jax.Array, like: PyTree) -> PyTree:
  """total / count, in the leaf dtypes of `like`."""
  return jax.tree.map(lambda t, x: (t / count).astype(x.dtype), total, like)


@jax.jit
def _add(total: PyTree, ingredient: PyTree) -> PyTree:
  """The float32 running sum of the soup's ingredients with one more."""
  return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, ingredient)


def _score(eval_fn: Callable[[PyTree], Any], model: PyTree, name: str) -> float:
  value = float(eval_fn(model))
  if not math.isfinite(value):
    raise ValueError(f"eval_fn({name}) returned {value}; scores must be finite")
  return value


def greedy_soup(
    models: Sequence[PyTree],
    eval_fn: Callable[[PyTree], Any],
    *,
    maximize: bool = True,
) -> tuple[PyTree, list[int]]:
  """The greedy soup of Wortsman et al. 2022 (Model soups, Recipe 1).

  Ingredients are sorted by their own held-out score, best first (ties keep
  the input order). The soup starts as the best ingredient; each next one is
  added when the uniform mean of the soup's ingredients and it scores at
  least as well as the soup did, and skipped otherwise.

  `eval_fn` runs on the host once per ingredient and once per candidate soup
  (2N - 1 calls in all) and may loop over a whole held-out set.

  Args:
    models: N >= 1 fine-tuned models of the same structure and leaf shapes.
    eval_fn: variables -> a finite scalar score (accuracy, or a loss with
      `maximize=False`).
    maximize: whether a larger score is better.

  Returns:
    `(soup, chosen)`: the uniform mean of the chosen ingredients (leaf dtypes
    of `models[0]`), and their indices into `models` in the order they were
    added (`chosen[0]` is the best ingredient).

  Raises:
    ValueError: no model, mismatched trees, or a non-finite score.
  """
  models = check_models(models)
  sign = 1.0 if maximize else -1.0
  scores = [sign * _score(eval_fn, m, f"models[{i}]") for i, m in enumerate(models)]
  order = sorted(range(len(models)), key=lambda i: -scores[i])
  total = jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float32), models[order[0]]
  )
  chosen, best = [order[0]], scores[order[0]]
  for i in order[1:]:
    candidate_total = _add(total, models[i])
    candidate = _soup_mean(candidate_total, len(chosen) + 1, models[0])
    score = sign * _score(eval_fn, candidate, f"soup + models[{i}]")
    if score >= best:
      total, best = candidate_total, score
      chosen.append(i)
  return _soup_mean(total, len(chosen), models[0]), chosen
