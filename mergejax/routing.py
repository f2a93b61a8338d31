"""Routing statistics of a mixture of experts, as a streamed accumulator.

    stat = routing_statistics(mj.models.moe.routing_fn(model), top_k=2, activations=True)
    r = mj.stats.accumulate(stat, variables, batches)   # a RoutingStats
    r.frequency          # f32[E]: the fraction of rows that route to each expert
    r.logit_similarity   # f32[E, E]: cosine of the experts' router-logit columns

`routing_fn(variables, x)` returns the router logits `f32[..., E]` of one
MoE block (every leading axis is rows: examples, or examples times tokens),
or the pair `(logits, hidden f32[..., E, h])` with each expert's hidden
activations on every row. The state is sums over rows (counts, logits,
probabilities, the logits' Gram), merged between batches by addition and
between devices by `psum`, so `accumulate` streams it over batches, devices
and processes like the other statistics; the hidden activations' moments are
`stats.moments` of the `E * h` units (Chan's merge), from which
`expert_correlation` gives every pair of experts' unit correlations (the
activation matching of M-SMoE).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax import stats

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class RoutingStats(NamedTuple):
  """One MoE block's routing over the rows seen (population statistics: / count).

  Attributes:
    count: the number of rows.
    frequency: f32[E], the fraction of rows with the expert among their top-k
      (sums to k).
    mean_logits: f32[E], the mean router logit.
    mean_probs: f32[E], the mean softmax probability.
    logit_similarity: f32[E, E], the cosine between two experts' logit
      columns over the rows, `G_ij / sqrt(G_ii G_jj)` with `G = sum l l^T`
      (M-SMoE's router-logits similarity).
    hidden_mean: f32[E, h] mean hidden activation per expert, or None.
    hidden_cov: f32[E, h, E, h] covariance of every pair of experts' hidden
      units over the rows, or None.
  """

  count: jax.Array
  frequency: jax.Array
  mean_logits: jax.Array
  mean_probs: jax.Array
  logit_similarity: jax.Array
  hidden_mean: jax.Array | None
  hidden_cov: jax.Array | None


def _outputs(routing_fn, activations: bool, variables, x):
  out = routing_fn(variables, x)
  logits, hidden = (out if isinstance(out, tuple) else (out, None))
  if activations and hidden is None:
    raise ValueError("routing_statistics: activations=True needs routing_fn to return (logits, hidden),"
                     " got one array")
  return logits, (hidden if activations else None)


def _check_shapes(logits, hidden) -> None:
  if len(logits.shape) < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"routing_statistics: router logits must be float f32[..., E], got {logits.dtype}"
                     f"{list(logits.shape)}")
  if hidden is not None and (len(hidden.shape) != len(logits.shape) + 1
                             or tuple(hidden.shape[:-1]) != tuple(logits.shape)):
    raise ValueError(f"routing_statistics: expert hidden activations must be f32[..., E, h] with the logits'"
                     f" leading axes {list(logits.shape)}, got {list(hidden.shape)}")


def routing_statistics(routing_fn: Callable[[PyTree, Any], Any], *, top_k: int,
                       activations: bool = False) -> stats.Accumulator:
  """An Accumulator of `RoutingStats` for `stats.accumulate`.

  Args:
    routing_fn: `(variables, x) -> logits f32[..., E]` or `(logits, hidden
      f32[..., E, h])` (e.g. `mj.models.moe.routing_fn(model)`).
    top_k: the experts each row is routed to, 1 <= top_k <= E (as the model's
      gating: `lax.top_k` of the logits).
    activations: also accumulate the hidden activations' moments (needs the pair).

  Raises:
    ValueError: for a bad `top_k` (at once, or against E when the shapes are
      first seen), logits that are not float with an expert axis, hidden
      activations whose leading axes differ from the logits', or a missing
      hidden output with `activations=True`.
  """
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"routing_statistics: top_k must be a positive int, got {top_k!r}")

  def hidden_features(variables, x):
    _, hidden = _outputs(routing_fn, True, variables, x)
    return [hidden.reshape(*hidden.shape[:-2], hidden.shape[-2] * hidden.shape[-1])]

  moments = stats.moments(hidden_features)

  def init(variables, x):
    logits, hidden = jax.eval_shape(lambda v, a: _outputs(routing_fn, activations, v, a), variables, x)
    _check_shapes(logits, hidden)
    e = logits.shape[-1]
    if top_k > e:
      raise ValueError(f"routing_statistics: top_k {top_k} exceeds the {e} experts of the router logits")
    sums = {"count": jnp.float32(0), "selected": jnp.zeros(e), "logits": jnp.zeros(e), "probs": jnp.zeros(e),
            "gram": jnp.zeros((e, e))}
    return sums, (moments.init(variables, x) if activations else None)

  def update(state, variables, x, mask, axis_name=None):
    sums, hidden_state = state
    logits, _ = _outputs(routing_fn, False, variables, x)
    e = logits.shape[-1]
    rows = jnp.asarray(logits, jnp.float32).reshape(-1, e)
    w = jnp.repeat(mask.astype(jnp.float32), rows.shape[0] // mask.shape[0])
    _, index = jax.lax.top_k(rows, top_k)
    selected = jax.nn.one_hot(index, e).sum(-2)
    batch = {"count": w.sum(), "selected": w @ selected, "logits": jnp.einsum("r,re->e", w, rows, precision=HIGHEST),
             "probs": w @ jax.nn.softmax(rows, axis=-1),
             "gram": jnp.einsum("r,re,rf->ef", w, rows, rows, precision=HIGHEST)}
    if axis_name is not None:
      batch = jax.lax.psum(batch, axis_name)
    sums = jax.tree.map(jnp.add, sums, batch)
    if hidden_state is not None:
      hidden_state = moments.update(hidden_state, variables, x, mask, axis_name)
    return sums, hidden_state

  def finalize(state):
    sums, hidden_state = state
    n = jnp.maximum(sums["count"], 1.0)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(sums["gram"]), 1e-30))
    hidden_mean = hidden_cov = None
    if hidden_state is not None:
      (m,) = moments.finalize(hidden_state)
      e = sums["selected"].shape[0]
      h = m["mean"].shape[0] // e
      hidden_mean, hidden_cov = m["mean"].reshape(e, h), m["cov"].reshape(e, h, e, h)
    return RoutingStats(sums["count"], sums["selected"] / n, sums["logits"] / n, sums["probs"] / n,
                        sums["gram"] / jnp.outer(norms, norms), hidden_mean, hidden_cov)

  return stats.Accumulator(init, update, finalize)


def expert_correlation(routing: RoutingStats) -> jax.Array:
  """f32[E, E, h, h]: the Pearson correlation of expert i's unit a and expert j's unit b over the rows.

  Raises:
    ValueError: if `routing` holds no hidden moments (`activations=False`).
  """
  if routing.hidden_cov is None:
    raise ValueError("expert_correlation: the routing statistics hold no hidden activations;"
                     " accumulate them with routing_statistics(..., activations=True)")
  e, h = routing.hidden_mean.shape
  std = jnp.sqrt(jnp.einsum("eheh->eh", routing.hidden_cov) + 1e-12)  # f32[E, h]
  corr = routing.hidden_cov / (std[:, :, None, None] * std[None, None, :, :])
  return corr.transpose(0, 2, 1, 3).reshape(e, e, h, h)
