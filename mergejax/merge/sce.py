"""SCE: select, calculate, erase (Wan et al., "FuseChat: Knowledge Fusion of
Chat Models", arXiv 2408.07990, Section 3.3).

A merge of task vectors `tau_i = models[i] - base`, tensor by tensor:

    merged = mj.merge.sce(base, [v1, v2, v3], density=0.1)

1. Select: the entries whose variance over the models' task vectors is among
   the `density` fraction largest of the tensor; every other entry of every
   task vector is set to 0.
2. Calculate: one coefficient per model and tensor, the sum of squares of its
   selected task vector, normalised to sum to 1 over the models.
3. Erase: per entry, the elected sign is that of the sum of the selected task
   vectors; the entries of the other sign are dropped.
4. The merged task vector is, per entry, the coefficient-weighted mean of the
   surviving entries; `base + scale * merged`.

Conventions follow mergekit's `sce` (arcee-ai/mergekit,
mergekit/merge_methods/sce.py), read for this module, with the differences
named in `sce`'s docstring. Every step sees one tensor at a time, so the merge
is per leaf: merging one leaf at a time (out of core) gives the same result.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.merge import task_vectors as tv

PyTree = Any


def _selected(taus: jax.Array, k: jax.Array) -> jax.Array:
  """taus: f32[N, *shape] with 0 outside the k entries of largest variance.

  The variance over models is the population one (divided by N), computed
  about the first model's values so that models equal at an entry give
  exactly 0 there. Entries tied with the k-th largest variance are all kept.
  """
  variance = jnp.var(taus - taus[0], axis=0)
  threshold = tv._kth_largest(variance.reshape(1, -1), k)[0]
  return jnp.where(variance >= threshold, taus, 0)


def _coefficients(selected: jax.Array) -> jax.Array:
  """eta: f32[N], each model's sum of squares over the sum of all models'.

  Uniform (1 / N) where every selected task vector is 0.
  """
  energy = jnp.sum(jnp.square(selected).reshape(len(selected), -1), axis=1)
  total = jnp.sum(energy)
  uniform = jnp.full_like(energy, 1.0 / len(selected))
  return jnp.where(total > 0, energy / jnp.where(total > 0, total, 1), uniform)


def _erased_mean(selected: jax.Array, eta: jax.Array) -> jax.Array:
  """f32[*shape]: the eta-weighted mean of the entries with the elected sign.

  The elected sign is + where the sum over models is >= 0 and - elsewhere;
  zero entries have no sign and never survive. 0 where nothing survives.
  """
  elected = jnp.where(jnp.sum(selected, axis=0) >= 0, 1.0, -1.0)
  weights = tv._per_model(eta, selected.ndim - 1) * (jnp.sign(selected) == elected)
  denominator = jnp.sum(weights, axis=0)
  numerator = jnp.sum(weights * selected, axis=0)
  return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0)


@jax.jit
def _sce_leaf(b, xs, k, scale):
  """SCE at one leaf: b + scale * the erased mean of the selected taus."""
  selected = _selected(tv._leaf_task_vectors(b, xs, None, 1.0), k)
  return tv._rebase(b, scale * _erased_mean(selected, _coefficients(selected)))


def sce(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    density: float = 1.0,
    scale: float = 1.0,
) -> PyTree:
  """SCE merging (FuseChat, arXiv 2408.07990): select, calculate, erase.

  Per leaf, with taus: f32[N, *shape] the task vectors models[i] - base:

  1. Select: var: f32[*shape] is the population variance of taus over the N
     models; the leaf keeps the entries with var >= the k-th largest var,
     k = `keep_count(density, size)` (ceil, at least 1), and sets every
     other entry of every tau_i to 0.
  2. Calculate: eta_i = sum(selected tau_i ** 2) / sum_j sum(selected
     tau_j ** 2), uniform where all are 0.
  3. Erase: the elected sign of an entry is + where sum_i selected tau_i >= 0
     (so a zero sum elects +) and - elsewhere; entry i survives where its
     sign is the elected one (a 0 never does).
  4. merged = sum_i eta_i s_i tau_i / sum_i eta_i s_i over the survivors s_i
     (0 where none survives); the result is base + scale * merged.

  Against mergekit's `sce` (its `select_topk` is `density`): mergekit keeps
  exactly floor(density * the number of non-zero variances) entries, breaking
  ties arbitrarily, and none when that is 0, where this keeps ceil(density *
  size) and every tie. Both skip nothing at density 1. Entries of zero
  variance (all models agree) are never selected by mergekit below density
  1 and are here only when the threshold is 0. `scale` is not in mergekit or
  the paper (scale 1 is theirs). The per-entry normalisation by the
  surviving coefficients is mergekit's.

  N copies of one model, or one model, give that model at any density and
  scale 1 (every variance is 0, so every entry is selected).

  Args:
    base: the pre-trained model (the paper's pivot).
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    density: the fraction of each leaf's entries to select, in (0, 1];
      mergekit's default 1 selects every entry.
    scale: lambda, the factor on the merged task vector.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), density outside (0, 1], or a non-finite scale.
  """
  models = tv._check_models(base, models)
  density = tv._check_density(density)
  scale = tv._check_scale(scale)
  return tv._map_leaves(
      lambda b, xs, keys: _sce_leaf(b, xs, tv.keep_count(density, np.size(b)), scale),
      base, models, None,
  )
