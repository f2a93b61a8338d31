"""WIDEN: merging by weight disentanglement into magnitudes and directions.

Yu et al., "Extend Model Merging from Fine-Tuned to Pre-Trained Large
Language Models via Weight Disentanglement" (arXiv 2408.03092); the steps
and conventions below are those of the authors' code, yule-BUAA/MergeLLM
(`MergingMethod.widen_merging` in `model_merging_methods/merging_methods.py`).

    merged = mj.merge.widen(base, [v1, v2], above_average_ratio=1.0)

Each weight is split into columns; a column's magnitude is its norm and its
direction the unit column. How much each model changed a column's magnitude
and direction, ranked among the leaf's columns, gives the model an importance
score per column, and the task vectors are added to the base weighted by
those scores. Task vectors are computed in float32 (or wider) and every
merged leaf keeps the base's dtype.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any
Axes = int | Sequence[int] | None
AxisRule = Callable[[str, Any], Axes] | Mapping[str, Axes] | None


def default_axes(leaf: Any) -> tuple[int, ...] | None:
  """The axes a column's norm runs over by default: the last of a >= 2-D leaf.

  A column is then one index of the leading axes, as the authors take one
  magnitude per input feature of a torch `Linear` weight [out, in]:
  a flax `Dense` kernel [in, out] has one column per input unit, an `Embed`
  table [vocab, features] one per token, and a conv kernel HWIO one per
  (h, w, in) position. Leaves of fewer axes (biases, norm scales) are merged
  entry by entry (None).
  """
  ndim = len(jnp.shape(leaf))
  return (ndim - 1,) if ndim >= 2 else None


def _normalized_axes(path: str, leaf: Any, axes: Axes) -> tuple[int, ...] | None:
  """axes as sorted non-negative ints, after checking them against the leaf."""
  if axes is None:
    return None
  ndim = len(jnp.shape(leaf))
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes or any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"axis of {path}: {axes} is not a non-empty set of axes of a {ndim}-D leaf")
  normalized = tuple(sorted({a % ndim for a in axes}))
  if len(normalized) != len(axes):
    raise ValueError(f"axis of {path}: {axes} repeats an axis")
  return normalized


def _column_axes(base: PyTree, axis: AxisRule) -> tuple[tuple[int, ...] | None, ...]:
  """Each leaf's column-norm axes, in flattening order (see `widen`)."""
  leaves = tree.leaves_with_paths(base)
  if isinstance(axis, Mapping):
    unknown = sorted(set(axis) - {path for path, _ in leaves})
    if unknown:
      raise ValueError(f"axis: {unknown[0]!r} is not a leaf path of the base")
    rule = lambda path, leaf: axis.get(path, default_axes(leaf))
  elif axis is None:
    rule = lambda path, leaf: default_axes(leaf)
  else:
    rule = axis
  return tuple(_normalized_axes(path, leaf, rule(path, leaf)) for path, leaf in leaves)


def _check_finite(name: str, value: float) -> float:
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  return float(value)


def _rank_significance(changes: jax.Array) -> jax.Array:
  """f32[N, C]: each change's rank among its row's C, divided by C.

  The smallest change of a model gets 0 and its largest (C - 1) / C; equal
  changes are ranked in column order.
  """
  order = jnp.argsort(changes, axis=1, stable=True)
  return jnp.argsort(order, axis=1, stable=True) / changes.shape[1]


def importance_scores(
    significance: jax.Array, above_average_ratio: float, calibrated_score: float
) -> jax.Array:
  """f32[N, C]: WIDEN's importance score of each model at each column.

  The softmax over the N models of the significance, except that where a
  model's significance exceeds `above_average_ratio` times its mean over the
  C columns, the score is `calibrated_score` instead.

  Args:
    significance: f32[N, C].
    above_average_ratio: t.
    calibrated_score: s.
  """
  scores = jax.nn.softmax(significance, axis=0)
  above = significance > above_average_ratio * jnp.mean(significance, axis=1, keepdims=True)
  return jnp.where(above, calibrated_score, scores)


def column_changes(
    b: jax.Array, xs: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """(f32[N, C], f32[N, C]): each model's magnitude and direction changes.

  Over the C columns (the indices of the axes not in `axes`, flattened): the
  magnitude change |‖x_i‖ - ‖b‖| and the direction change 1 - cos(x_i, b),
  norms and cosines over `axes`. A zero column has no direction: its cosine
  with anything is 0.

  Args:
    b: the base's leaf, in float32 or wider.
    xs: f32[N, *b.shape], the models' leaves.
    axes: the column-norm axes of b.
  """
  model_axes = tuple(a + 1 for a in axes)
  base_norm = jnp.sqrt(jnp.sum(b * b, axis=axes))
  norms = jnp.sqrt(jnp.sum(xs * xs, axis=model_axes))
  dots = jnp.sum(xs * b, axis=model_axes)
  norm_products = norms * base_norm
  cosines = jnp.where(norm_products > 0, dots / jnp.where(norm_products > 0, norm_products, 1), 0)
  num = xs.shape[0]
  return jnp.abs(norms - base_norm).reshape(num, -1), (1 - cosines).reshape(num, -1)


@functools.partial(jax.jit, static_argnums=2)
def _widen_leaf(b, xs, axes, above_average_ratio, calibrated_score):
  """WIDEN at one leaf: base + sum_i w_i tau_i, w_i per column (or entry)."""
  taus = tv._leaf_task_vectors(b, xs, None, 1.0)
  num = len(xs)
  if axes is None:
    weights = importance_scores(
        jnp.abs(taus).reshape(num, -1), above_average_ratio, calibrated_score
    ).reshape(taus.shape)
  else:
    dtype = taus.dtype
    stacked = jnp.stack([x.astype(dtype) for x in xs])
    magnitude, direction = column_changes(b.astype(dtype), stacked, axes)
    score = lambda changes: importance_scores(
        _rank_significance(changes), above_average_ratio, calibrated_score
    )
    column_shape = [1 if a in axes else n for a, n in enumerate(b.shape)]
    weights = (0.5 * (score(magnitude) + score(direction))).reshape(num, *column_shape)
  return tv._rebase(b, jnp.sum(weights * taus, axis=0))


def widen(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    above_average_ratio: float = 1.0,
    calibrated_score: float = 1.0,
    axis: AxisRule = None,
) -> PyTree:
  """WIDEN (Yu et al. 2024, arXiv 2408.03092) over models that share a base.

  For a leaf split into C columns (see `axis`), with tau_i = models[i] - base:

  1. Disentangle: a column's magnitude is its L2 norm and its direction the
     column over its norm, in the base and in each model.
  2. Changes: per column, the magnitude change |‖x_i‖ - ‖b‖| and the
     direction change 1 - cos(x_i, b) (`column_changes`).
  3. Rank: within each model, the magnitude changes of its C columns are
     ranked, smallest first, and divided by C (significance in [0, 1)); so
     are the direction changes.
  4. Score: the softmax over the N models of the significance, replaced by
     s = `calibrated_score` where a model's significance exceeds t =
     `above_average_ratio` times its mean over the columns
     (`importance_scores`); with the default t = 1 about the upper half of a
     model's columns get s.
  5. Fuse: w_i = (magnitude score + direction score) / 2 per column, and the
     merged leaf is base + sum_i w_i tau_i (the weights are not normalised:
     s = 1 adds a calibrated column's whole task vector).

  Leaves merged entry by entry (1-D and scalar leaves by default) skip the
  ranking: their scores come from |tau_i| itself, entry by entry, through the
  same softmax and calibration (the mean over the leaf's entries), and w_i is
  that one score.

  The authors' defaults are t = 1 and s = 1. Models equal to the base give
  the base; one model, or N copies of one with s = 1/N, gives that model.
  Every leaf is merged on its own, so a merge that sees one leaf at a time
  gives the same result.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned (or further pre-trained) from it.
    above_average_ratio: t, the multiple of the mean significance above
      which a score is calibrated.
    calibrated_score: s, the score given to those columns.
    axis: the axes a column's norm runs over, per leaf: None for the default
      (`default_axes`: the last axis of a >= 2-D leaf, entry by entry
      otherwise); a mapping from a leaf's path (`a/b/c`) to an int, a tuple
      of ints or None (entry by entry), leaves not in it taking the default;
      or a callable `(path, base_leaf) -> int | tuple | None`. For a conv
      kernel HWIO, `(0, 1, 2)` gives one column per output channel.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), a non-finite t or s, a mapping key that is not a leaf path,
      or axes that are not axes of their leaf (naming its path).
  """
  models = tv._check_models(base, models)
  above_average_ratio = _check_finite("above_average_ratio", above_average_ratio)
  calibrated_score = _check_finite("calibrated_score", calibrated_score)
  # `_map_leaves` visits the leaves in flattening order, as `_column_axes` lists them.
  axes = iter(_column_axes(base, axis))
  return tv._map_leaves(
      lambda b, xs, _: _widen_leaf(b, xs, next(axes), above_average_ratio, calibrated_score),
      base, models, None,
  )
