"""Tests for mergejax.align: each matching recovers a hidden permutation.

The oracle: model B is model A with a random permutation drawn from the traced
spec applied (the same function), so a correct matching returns exactly that
permutation, and averaging A with B aligned returns A.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from mergejax import align
from mergejax import models
from mergejax import permute
from mergejax import trace
from mergejax import tree
from test_models import SMALL, _init
from test_trace import _transformer, _transformer_params


def _permuted_copy(spec, variables, seed=0):
  perm = permute.random_permutation(spec, jax.random.key(seed))
  return permute.apply_permutation(spec, perm, variables), perm


def _assert_recovers(result, perm):
  for g, p in perm.items():
    np.testing.assert_array_equal(np.asarray(result.perm[g]), np.asarray(p), err_msg=g)


def _zoo(name, batch=4):
  config, input_shape = SMALL[name]
  model = models.build(name, **config)
  variables, x = _init(model, input_shape, batch=batch)
  return model, variables, x, trace.permutation_spec(model.apply, variables, x)


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit"])
def test_weight_matching_recovers_a_permutation_and_the_average_is_the_model(name):
  model, va, x, spec = _zoo(name)
  vb, perm = _permuted_copy(spec, va)
  result = align.weight_matching(spec, vb, va, key=jax.random.key(1))
  _assert_recovers(result, perm)
  aligned = permute.apply_permutation(spec, result.perm, va)
  for a, b in zip(jax.tree.leaves(tree.lerp(vb, aligned, 0.5)), jax.tree.leaves(vb)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # The objective never decreases over sweeps and ends at <A, A>.
  trace_ = np.asarray(result.objective_trace)
  assert np.all(np.diff(trace_) >= -1e-4 * abs(trace_[-1]))
  np.testing.assert_allclose(trace_[-1], float(tree.vdot(vb, vb)), rtol=1e-5)


def test_weight_matching_plain_jnp_transformer():
  params = _transformer_params()
  x = np.ones((1, 5, 5), np.float32)
  spec = trace.permutation_spec(_transformer, params, x)
  vb, perm = _permuted_copy(spec, params, seed=3)
  _assert_recovers(align.weight_matching(spec, vb, params), perm)


def test_weight_matching_cost_and_scores_match_numpy():
  rng = np.random.default_rng(0)
  va = {"w1": rng.standard_normal((3, 5)), "b1": rng.standard_normal(5), "w2": rng.standard_normal((5, 2))}
  vb = {k: rng.standard_normal(v.shape) for k, v in va.items()}
  va, vb = (jax.tree.map(lambda v: v.astype(np.float32), t) for t in (va, vb))
  spec = trace.permutation_spec(lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], va, np.ones((1, 3), np.float32))
  result = align.weight_matching(spec, va, vb)
  (g,) = spec.groups
  cost = va["w1"].T @ vb["w1"] + np.outer(va["b1"], vb["b1"]) + va["w2"] @ vb["w2"].T
  p = np.asarray(result.perm[g])
  # One group: the assignment is optimal for the cost, and scores are its entries.
  best = cost[np.arange(5), p].sum()
  for q in itertools.permutations(range(5)):
    assert cost[np.arange(5), list(q)].sum() <= best + 1e-4
  np.testing.assert_allclose(result.pair_scores[g], cost[np.arange(5), p], rtol=1e-5)


def _host_weight_matching(spec, va, vb, key, max_sweeps=100, tol=1e-7):
  """Git Re-Basin's loop on the host, every group solved in every sweep."""
  costs = align._WeightCosts(spec)
  a, b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
  perm = {g: np.arange(n) for g, n in spec.sizes.items()}

  def objective(perm):
    return float(tree.vdot(va, permute.apply_permutation(spec, perm, vb)))

  history, prev, obj = [], -np.inf, objective(perm)
  for s in range(max_sweeps):
    if s >= 2 and not obj - prev > tol * abs(prev):
      break
    key, sub = jax.random.split(key)
    improved = False
    for k in np.asarray(jax.random.permutation(sub, len(costs.names))):
      g = costs.names[k]
      c = np.asarray(costs.cost(g, perm, a, b))
      new = scipy.optimize.linear_sum_assignment(c, maximize=True)[1]
      rows = np.arange(len(new))
      old_score, new_score = c[rows, perm[g]].sum(), c[rows, new].sum()
      improved |= bool(new_score > old_score + 1e-6 * abs(old_score))
      perm[g] = new
    prev, obj = obj, objective(perm)
    history.append(obj)
    if not improved:
      break
  return perm, np.array(history)


def test_weight_matching_equals_git_rebasins_loop_on_the_host():
  """Same group orders, assignments, stopping rule and objectives, sweep by sweep."""
  model, va, x, spec = _zoo("resnet20")
  vb = model.init(jax.random.key(7), x)
  key = jax.random.key(2)
  result = align.weight_matching(spec, va, vb, key=key)
  perm, history = _host_weight_matching(spec, va, vb, key)
  assert len(history) >= 3  # several sweeps
  for g in spec.groups:
    np.testing.assert_array_equal(np.asarray(result.perm[g]), perm[g], err_msg=g)
  np.testing.assert_allclose(result.objective_trace, history, rtol=1e-5)


def test_weight_matching_compiles_once_per_spec():
  _, va, _, spec = _zoo("mlp")
  vb, _ = _permuted_copy(spec, va)
  align._weight_matching_loop.cache_clear()
  align.weight_matching(spec, va, vb)
  align.weight_matching(spec, vb, va, key=jax.random.key(5))
  info = align._weight_matching_loop.cache_info()
  assert (info.misses, info.hits) == (1, 1)


def test_several_models_align_to_one_reference():
  _, va, _, spec = _zoo("mlp")
  copies = [_permuted_copy(spec, va, seed=s) for s in (1, 2, 3)]
  results = align.weight_matching(spec, va, [vb for vb, _ in copies])
  assert len(results) == 3
  for result, (vb, perm) in zip(results, copies):
    aligned = permute.apply_permutation(spec, result.perm, vb)
    for a, b in zip(jax.tree.leaves(aligned), jax.tree.leaves(va)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_activation_matching_recovers_a_permutation(name):
  model, va, x, spec = _zoo(name)
  # Positive biases keep every ReLU unit alive: a dead unit correlates with
  # nothing, so its match would be arbitrary.
  va = jax.tree_util.tree_map_with_path(
      lambda p, v: np.abs(v) + 1 if jax.tree_util.keystr(p).endswith("['bias']") else v, va)
  vb, perm = _permuted_copy(spec, va)
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((16, *x.shape[1:])).astype(np.float32) for _ in range(3)]
  result = align.activation_matching(spec, model.apply, vb, va, batches, progress=False)
  _assert_recovers(result, perm)
  for g in spec.groups:  # a unit correlates perfectly with its own copy
    np.testing.assert_allclose(result.pair_scores[g] / np.max(result.pair_scores[g]), 1.0, atol=1e-3)


def test_activation_matching_through_a_flatten_keeps_spatial_positions():
  model = models.build("vgg", features=(4, "M", 6), dense=(5,), batch_norm=False)
  va, x = _init(model, (8, 8, 1), batch=4)
  va = jax.tree_util.tree_map_with_path(
      lambda p, v: np.abs(v) + 1 if jax.tree_util.keystr(p).endswith("['bias']") else v, va)
  spec = trace.permutation_spec(model.apply, va, x)
  vb, perm = _permuted_copy(spec, va)
  batches = [np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype(np.float32)]
  _assert_recovers(align.activation_matching(spec, model.apply, vb, va, batches, progress=False), perm)


def test_ste_matching_recovers_a_permutation():
  model, va, x, spec = _zoo("mlp")
  vb, perm = _permuted_copy(spec, va)
  rng = np.random.default_rng(0)
  data = [(rng.standard_normal((16, *x.shape[1:])).astype(np.float32), rng.integers(0, 10, 16))
          for _ in range(2)]

  def loss_fn(variables, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, x), y).mean()

  result = align.ste_matching(spec, loss_fn, vb, va, data, num_steps=5)
  _assert_recovers(result, perm)
  assert result.objective_trace.shape == (5,)


def test_mismatched_models_are_refused_naming_the_path():
  _, va, _, spec = _zoo("mlp")
  vb = jax.tree.map(lambda v: v, va)
  vb["params"]["hidden_1"]["bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match="params/hidden_1/bias"):
    align.weight_matching(spec, va, vb)
