"""Tests for mergejax.merge.curvature: reading Adam's second moments from optax
states, and OTA merging against NumPy, its identities and its errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_average import average_reference
from tests.test_average import pytrees

_PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.3)}


def _loss(params):
  """A tiny quadratic with a different curvature per entry."""
  a, c = jnp.array([1.0, 4.0, 0.25]), jnp.array([1.0, 2.0, -1.0])
  return jnp.sum(a * (params["w"] - c) ** 2) + 3.0 * (params["b"] - 1.0) ** 2


def _train(optimizer, steps):
  """(params, opt_state, [gradients]) after `steps` steps of `optimizer`."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  params, state, grads = _PARAMS, optimizer.init(_PARAMS), []
  for _ in range(steps):
    params, state, g = step(params, state)
    grads.append(g)
  return params, state, grads


def reference_nu(grads, b2):
  """sum_t (1 - b2) b2 ** (T - t) g_t ** 2, in float64, per leaf."""
  steps = len(grads)
  return jax.tree.map(
      lambda *gs: sum((1 - b2) * b2 ** (steps - 1 - t) * np.asarray(g, np.float64) ** 2
                      for t, g in enumerate(gs)),
      *grads,
  )


def test_reads_nu_of_a_real_adamw_run_inside_chain_and_inject_hyperparams():
  b2 = 0.99
  optimizer = optax.chain(
      optax.clip_by_global_norm(1e6),
      optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, b2=b2, weight_decay=1e-3),
  )
  params, state, grads = _train(optimizer, 12)
  want = reference_nu(grads, b2)
  assert_trees_close(mj.merge.adam_second_moments(state, params), want, rtol=1e-5, atol=0)
  corrected = jax.tree.map(lambda v: v / (1 - b2**12), want)
  assert_trees_close(mj.merge.adam_second_moments(state, params, b2=b2), corrected, rtol=1e-5, atol=0)


def test_reads_nu_inside_a_mask_that_keeps_every_parameter():
  params, state, grads = _train(optax.masked(optax.adam(0.05), {"w": True, "b": True}), 5)
  assert_trees_close(mj.merge.adam_second_moments(state, params), reference_nu(grads, 0.999),
                     rtol=1e-5, atol=0)


def test_unusable_optimizer_states_are_named():
  _, masked, _ = _train(optax.masked(optax.adam(0.05), {"w": True, "b": False}), 1)
  with pytest.raises(ValueError, match="masked out .* b: in tree 0, not in tree 1"):
    mj.merge.adam_second_moments(masked, _PARAMS)
  with pytest.raises(ValueError, match="no optax ScaleByAdamState"):
    mj.merge.adam_second_moments(optax.sgd(0.1, momentum=0.9).init(_PARAMS), _PARAMS)
  adam = optax.adam(0.1).init(_PARAMS)
  with pytest.raises(ValueError, match="2 ScaleByAdamStates"):
    mj.merge.adam_second_moments((adam, adam), _PARAMS)
  with pytest.raises(ValueError, match=r"does not match params.* w: \(2,\) vs \(3,\)"):
    mj.merge.adam_second_moments(adam, {"w": jnp.zeros(2), "b": jnp.zeros(())})
  with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
    mj.merge.adam_second_moments(adam, _PARAMS, b2=1.0)
  with pytest.raises(ValueError, match="step count is 0"):
    mj.merge.adam_second_moments(adam, _PARAMS, b2=0.999)


def reference_ota(models, nus, power, weights, epsilon):
  """sum_i w_i P_i theta_i / sum_i w_i P_i, P_i = max(nu_i ** power, eps)."""
  w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
  leaves = [jax.tree.leaves(m) for m in models]
  curvatures = [jax.tree.leaves(v) for v in nus]
  merged = []
  for j in range(len(leaves[0])):
    p = [wi * np.maximum(np.asarray(c[j], np.float64) ** power, epsilon) for wi, c in zip(w, curvatures)]
    merged.append(sum(pi * np.asarray(ls[j], np.float64) for pi, ls in zip(p, leaves)) / sum(p))
  return jax.tree.unflatten(jax.tree.structure(models[0]), merged)


@st.composite
def models_and_second_moments(draw):
  n = draw(st.integers(1, 4))
  trees = draw(pytrees(2 * n, discrete=False))
  return trees[:n], [jax.tree.map(lambda x: np.abs(x) ** 2 * 1e-4, t) for t in trees[n:]]


@hypothesis.settings(max_examples=5)
@hypothesis.given(
    models_and_second_moments(), st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    st.none() | st.lists(st.floats(0.1, 3.0), min_size=4, max_size=4),
)
def test_ota_matches_numpy(case, power, weights):
  models, nus = case
  weights = None if weights is None else weights[: len(models)]
  assert_trees_close(
      mj.merge.ota(models, nus, power=power, weights=weights),
      reference_ota(models, nus, power, weights, 1e-30),
      rtol=1e-4, atol=1e-5,
  )


@hypothesis.settings(max_examples=5)
@hypothesis.given(models_and_second_moments(), st.floats(1e-3, 1e3))
def test_equal_or_rescaled_second_moments(case, constant):
  models, nus = case
  assert_trees_close(mj.merge.ota(models, [nus[0]] * len(models)), average_reference(models, None))
  rescaled = [jax.tree.map(lambda v: constant * v, nu) for nu in nus]
  assert_trees_close(mj.merge.ota(models, rescaled, power=1.0), mj.merge.ota(models, nus, power=1.0),
                     rtol=1e-4, atol=1e-5)


def test_flatter_model_gives_way_entry_by_entry():
  models = [{"w": np.array([0.0, 0.0], np.float32)}, {"w": np.array([1.0, 1.0], np.float32)}]
  nus = [{"w": np.array([9.0, 1.0], np.float32)}, {"w": np.array([1.0, 9.0], np.float32)}]
  # sqrt(nu): weights 3 : 1 on entry 0 and 1 : 3 on entry 1.
  np.testing.assert_allclose(mj.merge.ota(models, nus)["w"], [0.25, 0.75], rtol=1e-6)
  np.testing.assert_allclose(mj.merge.ota(models, nus, power=1.0)["w"], [0.1, 0.9], rtol=1e-6)


_MODEL = {"w": np.ones(3, np.float32)}
_NU = {"w": np.ones(3, np.float32)}


@pytest.mark.parametrize(
    "nus, kwargs, match",
    [
        ([_NU], {}, "second_moments .*2 models but 1 fishers"),
        ([_NU, {"w": np.ones(2, np.float32)}], {}, r"second_moments .*fishers\[1\] does not match models\[1\]: w"),
        ([_NU, {"w": -np.ones(3, np.float32)}], {}, r"second_moments .*fishers\[1\]: w has negative entries"),
        ([_NU, {"w": np.full(3, np.nan, np.float32)}], {}, r"second_moments .*fishers\[1\]: w has 3 NaN"),
        ([_NU, _NU], {"power": 0.0}, "power must be finite and > 0"),
        ([_NU, _NU], {"epsilon": 0.0}, "epsilon must be finite and > 0"),
        ([_NU, _NU], {"weights": [1.0]}, "weights: 2 models but weights of shape"),
    ],
)
def test_bad_arguments_are_named(nus, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.ota([_MODEL, _MODEL], nus, **kwargs)
