"""PCB-Merging: parameter competition balancing over models that share a base.

Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024,
arXiv 2410.02396), Section 3 and Algorithm 1; the authors' code is
duguodong7/pcb-merging (`pcb-merging.py`).

    merged = mj.merge.pcb(base, [v1, v2, v3], density=0.1, scale=1.0)

Each entry of each task vector tau_i = models[i] - base gets a balancing score
beta_i from its own task (intra-balancing) and from its agreement with every
task (inter-balancing); each task keeps its top `density` fraction of scores,
and the merged task vector is the score-weighted mean of the kept entries.
Task vectors are computed in float32 (or wider) and every merged leaf keeps
the base's dtype.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any

SCOPES = ("global", "tensor")


def _min_max_normalized(x: jax.Array) -> jax.Array:
  """(x - min) / (max - min) along the last axis; 0 where max == min."""
  low = jnp.min(x, axis=-1, keepdims=True)
  span = jnp.max(x, axis=-1, keepdims=True) - low
  return jnp.where(span > 0, (x - low) / jnp.where(span > 0, span, 1), 0)


def balancing_scores(taus: jax.Array) -> jax.Array:
  """beta: f32[N, D], PCB's balancing score of every entry of every task.

  beta_i = beta_intra,i * beta_inter,i with

    beta_intra,i = softmax(N * Norm(tau_i * tau_i)),
    beta_inter,i = sum_j softmax(Norm(tau_i * tau_j)),

  products entry by entry, Norm the min-max normalisation over the D entries
  (to [0, 1]; 0 where all D are equal) and each softmax over the D entries.

  Args:
    taus: f32[N, D], the N task vectors over the D entries of the scope.
  """
  num = taus.shape[0]
  intra = jax.nn.softmax(num * _min_max_normalized(taus * taus), axis=-1)
  inter = sum(
      jax.nn.softmax(_min_max_normalized(taus * taus[j]), axis=-1) for j in range(num)
  )
  return intra * inter


def _balanced_task_vector(taus: jax.Array, k: jax.Array) -> jax.Array:
  """f32[D]: sum_i (beta_i tau_i) / sum_i beta_i over each task's top-k beta.

  Model i keeps the entries whose beta_i is at least its k-th largest (every
  tie included); an entry that no model keeps is 0.
  """
  if taus.shape[1] == 0:  # An empty scope: nothing to balance.
    return jnp.zeros(taus.shape[1:], taus.dtype)
  beta = balancing_scores(taus)
  thresholds = tv._kth_largest(beta, k)
  kept = jnp.where(beta >= thresholds[:, None], beta, 0)
  total = jnp.sum(kept, axis=0)
  weighted = jnp.sum(kept * taus, axis=0)
  return jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1), 0)


@jax.jit
def _pcb_leaf(b, xs, k, scale):
  """PCB with the scope one leaf: base + scale * the balanced task vector."""
  taus = tv._leaf_task_vectors(b, xs, None, 1.0).reshape(len(xs), -1)
  return tv._rebase(b, scale * _balanced_task_vector(taus, k).reshape(b.shape))


@jax.jit
def _pcb_global(base, models, k, scale):
  """PCB with the scope the whole model, its leaves flattened end to end."""
  leaves, treedef = jax.tree.flatten(base)
  model_leaves = [treedef.flatten_up_to(m) for m in models]
  taus = jnp.concatenate(
      [
          tv._leaf_task_vectors(b, [ms[j] for ms in model_leaves], None, 1.0)
          .reshape(len(models), -1)
          for j, b in enumerate(leaves)
      ],
      axis=1,
  )
  merged = _balanced_task_vector(taus, k)
  pieces = jnp.split(merged, np.cumsum([np.size(b) for b in leaves])[:-1])
  return treedef.unflatten(
      [tv._rebase(b, scale * p.reshape(np.shape(b))) for b, p in zip(leaves, pieces)]
  )


def _check_scope(scope: str) -> str:
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  return scope


def pcb(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    density: float = 0.1,
    scale: float = 1.0,
    scope: str = "global",
) -> PyTree:
  """PCB-Merging (Du et al. 2024, arXiv 2410.02396, Algorithm 1).

  With tau_i = models[i] - base (f32[D] over the D entries of the scope) and
  N models:

  1. Intra-balancing: beta_intra,i = softmax(N * Norm(tau_i * tau_i)).
  2. Inter-balancing: beta_inter,i = sum_j softmax(Norm(tau_i * tau_j)).
  3. beta_i = beta_intra,i * beta_inter,i (see `balancing_scores`).
  4. Drop: model i keeps the entries whose beta_i is among its k largest,
     k = `keep_count(density, D)` (every entry tied with the k-th included),
     and its other scores become 0.
  5. Rescale: tau = sum_i (beta_i tau_i) / sum_i beta_i over the kept scores,
     0 where no model keeps the entry.

  The result is base + scale * tau. Products are entry by entry; Norm is the
  min-max normalisation to [0, 1] over the D entries (0 where all are equal)
  and every softmax is over the D entries, as in the authors' code, where D
  is the whole model flattened (`scope="global"`, the default) or, with
  `scope="tensor"`, one leaf at a time.

  Three details of the authors' `pcb-merging.py` differ from the equations
  and are not reproduced: it clamps |tau| to its 0.01% and 99.99% quantiles
  first, replaces the intra softmax by exp (dropping its normaliser) and the
  inter sum by tanh(tau_i * sum_j tau_j), and min-max normalises the kept
  scores again before the weighted mean.

  With one model and density 1, or copies of one model and density 1, the
  result is base + scale * tau_1; merging is invariant to the models' order.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    density: r, the fraction of each task's scores to keep, in (0, 1]; the
      authors' default is 0.1.
    scale: lambda, the factor on the merged task vector.
    scope: "global" (scores over the whole model) or "tensor" (per leaf).

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), density outside (0, 1], a non-finite scale or an unknown
      scope.
  """
  models = tv._check_models(base, models)
  density = tv._check_density(density)
  scale = tv._check_scale(scale)
  if _check_scope(scope) == "tensor":
    return tv._map_leaves(
        lambda b, xs, _: _pcb_leaf(b, xs, tv.keep_count(density, np.size(b)), scale),
        base, models, None,
    )
  k = tv.keep_count(density, tree.num_params(base))
  return _pcb_global(base, models, k, scale)
