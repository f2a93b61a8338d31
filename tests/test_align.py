"""Tests for mergejax.align: each matching recovers a hidden permutation.

The oracle: model B is model A with a random permutation drawn from the traced
spec applied (the same function), so a correct matching returns exactly that
permutation, and averaging A with B aligned returns A.
"""

import itertools
import logging

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


def _numpy_cost(spec, g, perm, a, b):
  """f64[n, n]: group g's weight-matching cost in NumPy, every term from scratch."""
  n = spec.sizes[g]
  total = np.zeros((n, n))
  for ref in spec.groups[g]:
    leaf_b = np.asarray(b[ref.path], np.float64)
    for h, refs in spec.groups.items():
      for r in refs:
        if r.path == ref.path and r != ref:
          leaf_b = permute.take_units(leaf_b, perm[h], r)
    leaf_a = np.asarray(a[ref.path], np.float64)
    total += align.unit_rows(leaf_a, ref) @ align.unit_rows(leaf_b, ref).T
  return total


def _numpy_weight_matching(spec, va, vb, key, max_sweeps=100, tol=1e-7):
  """Git Re-Basin's loop in NumPy: every group solved in every sweep, stopping
  after one in which no group's objective rose by more than 1e-6 of it, or
  whose total gain is under `tol`."""
  names = list(spec.groups)
  a, b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
  perm = {g: np.arange(n) for g, n in spec.sizes.items()}

  def objective(perm):
    aligned = tree.leaves_by_path(permute.apply_permutation(spec, perm, vb))
    return sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(aligned[p], np.float64))) for p, x in a.items())

  history, prev, obj = [], -np.inf, -np.inf
  for s, order in enumerate(align._sweep_orders(key, len(names), max_sweeps)):
    if s >= 2 and not obj - prev > tol * abs(prev):
      break
    improved = False
    for k in order:
      g = names[k]
      c = _numpy_cost(spec, g, perm, a, b)
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


@pytest.fixture(scope="module")
def resnet_pair():
  """A small ResNet-20 and an independent init: several sweeps to converge."""
  model, va, x, spec = _zoo("resnet20")
  return spec, va, _init(model, x.shape[1:], seed=8)[0]


def test_weight_matching_equals_git_rebasins_loop_in_numpy(resnet_pair):
  """Same group orders, assignments, stopping rule and objectives, sweep by sweep."""
  spec, va, vb = resnet_pair
  key = jax.random.key(2)
  result = align.weight_matching(spec, va, vb, key=key)
  perm, history = _numpy_weight_matching(spec, va, vb, key)
  assert len(history) >= 3  # several sweeps
  for g in spec.groups:
    np.testing.assert_array_equal(np.asarray(result.perm[g]), perm[g], err_msg=g)
  np.testing.assert_allclose(result.objective_trace, history, rtol=1e-5)
  a, b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
  for g in spec.groups:  # each matched pair's score at the final permutations
    want = _numpy_cost(spec, g, perm, a, b)[np.arange(spec.sizes[g]), perm[g]]
    np.testing.assert_allclose(result.pair_scores[g], want, rtol=1e-4, atol=1e-5, err_msg=g)


def test_the_compiled_loop_equals_the_host_sweeps():
  """The one-program loop (accelerators, `ste_matching`) and the host sweeps agree."""
  model, va, x, spec = _zoo("mlp")
  vb = _init(model, x.shape[1:], seed=5)[0]
  key = jax.random.key(3)
  host = align.weight_matching(spec, va, vb, key=key)
  ident = {g: jnp.arange(n, dtype=jnp.int32) for g, n in spec.sizes.items()}
  orders = align._sweep_orders(key, len(spec.groups), 100)
  perm, history, sweeps = align._weight_matching_loop(align._spec_key(spec), "auto", 1e-7)(orders, ident, va, vb)
  assert int(sweeps) == len(host.objective_trace) >= 2
  for g in spec.groups:
    np.testing.assert_array_equal(np.asarray(perm[g]), np.asarray(host.perm[g]), err_msg=g)
  np.testing.assert_allclose(history[: int(sweeps)], host.objective_trace, rtol=1e-5)


def test_weight_matching_stops_when_no_assignment_changes(resnet_pair, monkeypatch):
  spec, va, vb = resnet_pair
  key = jax.random.key(2)
  calls = []
  products = align._unit_products
  monkeypatch.setattr(align, "_unit_products", lambda x, y: calls.append(x.shape) or products(x, y))
  full = align.weight_matching(spec, va, vb, key=key)
  trace_ = np.asarray(full.objective_trace)
  products_needed = sum(len(refs) for refs in spec.groups.values())  # one per term
  # Terms no permutation changed are not recomputed: fewer products than a full recompute per sweep.
  assert len(calls) < len(trace_) * products_needed
  # The last sweep changed nothing: one sweep fewer ends at the same permutation.
  shorter = align.weight_matching(spec, va, vb, key=key, max_sweeps=len(trace_) - 1)
  for g in spec.groups:
    np.testing.assert_array_equal(shorter.perm[g], full.perm[g], err_msg=g)
  np.testing.assert_allclose(trace_[-1], trace_[-2], rtol=1e-6)
  # From the converged permutation: one sweep, every product computed once (none
  # again for the objective or the pair scores), the permutation kept.
  calls.clear()
  again = align.weight_matching(spec, va, vb, key=key, init_perm=full.perm)
  assert len(again.objective_trace) == 1
  np.testing.assert_allclose(again.objective_trace, trace_[-1:], rtol=1e-6)
  for g in spec.groups:
    np.testing.assert_array_equal(again.perm[g], full.perm[g], err_msg=g)
    np.testing.assert_allclose(again.pair_scores[g], full.pair_scores[g], rtol=1e-5, err_msg=g)
  assert len(calls) == products_needed


def test_terms_updated_for_a_few_moved_units_equal_the_numpy_loop(monkeypatch):
  """Wide groups whose late sweeps move few units: cached terms are updated by the
  moved units alone (a rank update), and the sweeps stay those of the NumPy loop."""
  model = models.build("mlp", features=(32, 32, 32))
  va, x = _init(model, SMALL["mlp"][1], batch=2)
  vb = _init(model, SMALL["mlp"][1], seed=2)[0]
  spec = trace.permutation_spec(model.apply, va, x)
  updates = []
  updated = align._HostSweeps._updated
  monkeypatch.setattr(align._HostSweeps, "_updated", lambda *a: updates.append(updated(*a)) or updates[-1])
  key = jax.random.key(0)
  result = align.weight_matching(spec, va, vb, key=key)
  assert any(u is not None for u in updates)
  perm, history = _numpy_weight_matching(spec, va, vb, key)
  for g in spec.groups:
    np.testing.assert_array_equal(result.perm[g], perm[g], err_msg=g)
  np.testing.assert_allclose(result.objective_trace, history, rtol=1e-6)


def _compiles(caplog, fn):
  """The programs `fn()` compiles (jax's compile log)."""
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    fn()
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]


def test_weight_matching_on_the_host_compiles_nothing(caplog):
  """The host sweeps' products are NumPy's, their assignments SciPy's and their group orders NumPy's:
  a first call compiles no program (widths and a group count no other test uses, so nothing
  compiled before hides a compile)."""
  rng = np.random.default_rng(0)
  widths = (3, 13, 17, 19, 2)

  def f(p, x):
    for k in range(len(widths) - 2):
      x = jnp.tanh(x @ p[f"w{k}"] + p[f"b{k}"])
    return x @ p[f"w{len(widths) - 2}"]

  def variables():
    v = {f"w{k}": rng.standard_normal(widths[k:k + 2]).astype(np.float32) for k in range(len(widths) - 1)}
    return v | {f"b{k}": rng.standard_normal(widths[k + 1]).astype(np.float32) for k in range(len(widths) - 2)}

  va, vb = variables(), variables()
  spec = trace.permutation_spec(f, va, np.ones((1, 3), np.float32))
  assert len(spec.groups) == 3
  key = jax.random.key(4)
  assert _compiles(caplog, lambda: align.weight_matching(spec, va, vb, key=key)) == []
  assert _compiles(caplog, lambda: jax.jit(lambda x: x + 1)(np.float32(1)))  # the log sees a compile


def test_sweep_orders_are_permutations_drawn_from_the_key():
  orders = align._sweep_orders(jax.random.key(5), 7, 4)
  assert orders.shape == (4, 7) and orders.dtype == np.int32
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(7))
  assert len({tuple(o) for o in orders}) > 1  # a new order each sweep
  np.testing.assert_array_equal(align._sweep_orders(jax.random.key(5), 7, 4), orders)
  assert not np.array_equal(align._sweep_orders(jax.random.key(6), 7, 4), orders)
  # A raw uint32 key (jax.random.PRNGKey) and its typed form give the same orders,
  # those of NumPy's generator seeded with the key's seed.
  np.testing.assert_array_equal(align._sweep_orders(jax.random.PRNGKey(5), 7, 4), orders)
  rng = np.random.default_rng(5)
  np.testing.assert_array_equal(orders, [rng.permutation(7) for _ in range(4)])


def test_weight_matching_with_a_group_on_both_axes_of_a_kernel():
  """A residual kernel maps the stream to itself: its terms read their own group."""
  rng = np.random.default_rng(0)

  def f(p, x):
    h = x @ p["embed"]
    h = h + jnp.tanh(h @ p["mix"])
    return h @ p["head"]

  va = {"embed": rng.standard_normal((3, 6)), "mix": rng.standard_normal((6, 6)), "head": rng.standard_normal((6, 2))}
  va = jax.tree.map(lambda v: v.astype(np.float32), va)
  spec = trace.permutation_spec(f, va, np.ones((1, 3), np.float32))
  assert any(len({r.path for r in refs}) < len(refs) for refs in spec.groups.values())
  vb = jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), va)
  key = jax.random.key(1)
  result = align.weight_matching(spec, va, vb, key=key)
  perm, history = _numpy_weight_matching(spec, va, vb, key)
  for g in spec.groups:
    np.testing.assert_array_equal(result.perm[g], perm[g], err_msg=g)
  np.testing.assert_allclose(result.objective_trace, history, rtol=1e-5)


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
