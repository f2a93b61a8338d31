"""Tests for mergejax.merge.fisher: Fisher-weighted averaging against NumPy,
its identities (equal Fishers, copies of one model, permutations), its
composition with mj.fisher, and its errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_average import average_reference
from tests.test_average import pytrees


def fisher_merge_reference(models, fishers, weights, epsilon):
  """sum_i w_i max(F_i, eps) x_i / sum_i w_i max(F_i, eps), leaf by leaf, float64."""
  w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
  thetas = [[np.asarray(x, np.float64) for x in jax.tree.leaves(m)] for m in models]
  floored = [[np.maximum(np.asarray(f, np.float64), epsilon) for f in jax.tree.leaves(fs)]
             for fs in fishers]
  merged = []
  for j in range(len(thetas[0])):
    numerator = sum(wi * f[j] * t[j] for wi, f, t in zip(w, floored, thetas))
    denominator = sum(wi * f[j] for wi, f in zip(w, floored))
    merged.append(numerator / denominator)
  return jax.tree.unflatten(jax.tree.structure(models[0]), merged)


def _fishers_like(models, rng, zero_fraction=0.3):
  """A non-negative Fisher per model, with some entries exactly 0 (below any floor)."""
  out = []
  for model in models:
    leaves = []
    for x in jax.tree.leaves(model):
      f = rng.exponential(size=np.shape(x)) * (rng.random(np.shape(x)) >= zero_fraction)
      leaves.append(f.astype(np.float32))
    out.append(jax.tree.unflatten(jax.tree.structure(model), leaves))
  return out


@st.composite
def fisher_case(draw):
  """N models, N Fishers, optional weights (one surely positive), an epsilon."""
  n = draw(st.integers(1, 4))
  models = draw(pytrees(n, discrete=False))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  fishers = _fishers_like(models, rng)
  weights = draw(st.none() | st.lists(st.floats(0, 5), min_size=n, max_size=n))
  if weights is not None:
    weights[draw(st.integers(0, n - 1))] += 0.5
  epsilon = draw(st.sampled_from([1e-8, 1e-3, 0.5]))
  return models, fishers, weights, epsilon


@hypothesis.given(fisher_case())
def test_fisher_merge_matches_numpy(case):
  models, fishers, weights, epsilon = case
  got = mj.merge.fisher(models, fishers, weights=weights, epsilon=epsilon)
  assert_trees_close(got, fisher_merge_reference(models, fishers, weights, epsilon))


@hypothesis.given(fisher_case(), st.floats(1e-3, 1e3))
def test_equal_fishers_give_the_weighted_average(case, level):
  models, fishers, weights, _ = case
  same = [jax.tree.map(lambda f: level * np.abs(f) + level, fishers[0])] * len(models)
  assert_trees_close(mj.merge.fisher(models, same, weights=weights),
                     average_reference(models, weights))


@hypothesis.given(fisher_case())
def test_fishers_below_the_floor_give_the_weighted_average(case):
  models, _, weights, _ = case
  zeros = [jax.tree.map(np.zeros_like, m) for m in models]
  assert_trees_close(mj.merge.fisher(models, zeros, weights=weights),
                     average_reference(models, weights))


@hypothesis.given(fisher_case())
def test_copies_of_a_model_merge_to_it(case):
  models, fishers, weights, epsilon = case
  copies = [models[0]] * len(models)
  assert_trees_close(mj.merge.fisher(copies, fishers, weights=weights, epsilon=epsilon),
                     models[0], rtol=1e-6, atol=1e-6)


@hypothesis.given(fisher_case(), st.randoms())
def test_fisher_merge_is_invariant_to_model_order(case, random):
  models, fishers, weights, epsilon = case
  order = list(range(len(models)))
  random.shuffle(order)
  shuffled = mj.merge.fisher([models[i] for i in order], [fishers[i] for i in order],
                             weights=None if weights is None else [weights[i] for i in order],
                             epsilon=epsilon)
  assert_trees_close(shuffled, mj.merge.fisher(models, fishers, weights=weights, epsilon=epsilon))


@hypothesis.given(fisher_case(), st.floats(1.0, 1e3))
def test_scaling_every_fisher_by_one_factor_changes_nothing(case, factor):
  models, fishers, weights, _ = case
  fishers = [jax.tree.map(lambda f: f + 1.0, fs) for fs in fishers]  # All above the floor.
  scaled = [jax.tree.map(lambda f: np.float32(factor) * f, fs) for fs in fishers]
  assert_trees_close(mj.merge.fisher(models, scaled, weights=weights),
                     mj.merge.fisher(models, fishers, weights=weights), rtol=1e-4, atol=1e-5)


def test_each_model_wins_where_its_fisher_dominates():
  a = {"w": np.array([1.0, 1.0, 5.0], np.float32)}
  b = {"w": np.array([-1.0, 3.0, 7.0], np.float32)}
  fa = {"w": np.array([1e6, 1.0, 0.0], np.float32)}
  fb = {"w": np.array([1.0, 1e6, 0.0], np.float32)}
  merged = mj.merge.fisher([a, b], [fa, fb])
  np.testing.assert_allclose(merged["w"], [1.0, 3.0, 6.0], rtol=1e-5)


def _mlp(variables, x):
  """Plain jax.numpy: x f32[batch, 3] -> f32[batch, 2]."""
  p = variables["params"]
  h = jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
  return h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]


def _mlp_variables(key):
  k0, k1, k2, k3 = jax.random.split(key, 4)
  return {"params": {
      "dense_0": {"kernel": jax.random.normal(k0, (3, 6)), "bias": jax.random.normal(k1, (6,))},
      "dense_1": {"kernel": jax.random.normal(k2, (6, 2)), "bias": jax.random.normal(k3, (2,))},
  }}


def test_merging_permuted_models_and_fishers_permutes_the_merge():
  """Permute first, then merge (the module's recipe): the merge of permuted
  models and Fishers is the permuted merge."""
  va, vb = _mlp_variables(jax.random.key(0)), _mlp_variables(jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (16, 3))
  spec = mj.permutation_spec(_mlp, va, x)
  rng = np.random.default_rng(3)
  fa, fb = _fishers_like([va, vb], rng)
  perm = mj.random_permutation(spec, jax.random.key(4))
  permuted = [mj.apply_permutation(spec, perm, t) for t in (va, vb, fa, fb)]
  assert_trees_close(
      mj.merge.fisher(permuted[:2], permuted[2:]),
      mj.apply_permutation(spec, perm, mj.merge.fisher([va, vb], [fa, fb])),
  )


def _softmax_regression(variables, x):
  """x f32[batch, 4] -> logits f32[batch, 3]."""
  return x @ variables["params"]["kernel"] + variables["params"]["bias"]


def test_merging_with_mj_fisher_leaves_untrained_leaves_averaged():
  """mj.fisher gives 0 to a leaf the logits never read (like BatchNorm
  statistics); the merge averages that leaf and weights the others."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 4)).astype(np.float32)

  def model(seed):
    r = np.random.default_rng(seed)
    return {"params": {"kernel": r.normal(size=(4, 3)).astype(np.float32),
                       "bias": r.normal(size=3).astype(np.float32)},
            "batch_stats": {"mean": r.normal(size=3).astype(np.float32)}}

  models = [model(6), model(7)]
  fishers = [mj.fisher(_softmax_regression, m, [x], progress=False) for m in models]
  for f in fishers:
    np.testing.assert_array_equal(f["batch_stats"]["mean"], 0.0)
    assert np.all(np.asarray(f["params"]["kernel"]) > 0)
  merged = mj.merge.fisher(models, fishers)
  np.testing.assert_allclose(merged["batch_stats"]["mean"],
                             (models[0]["batch_stats"]["mean"] + models[1]["batch_stats"]["mean"]) / 2,
                             rtol=1e-6)
  assert_trees_close(merged, fisher_merge_reference(models, fishers, None, 1e-8))


def test_fisher_merge_keeps_leaf_dtypes():
  a = {"w": jnp.ones(3, jnp.bfloat16)}
  b = {"w": jnp.zeros(3, jnp.bfloat16)}
  f = {"w": jnp.ones(3, jnp.float32)}
  merged = mj.merge.fisher([a, b], [f, jax.tree.map(lambda x: 3 * x, f)])
  assert merged["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(merged["w"], np.float32), 0.25)


_A = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}}
_B = {"params": {"dense": {"kernel": np.zeros((2, 3), np.float32)}}}


@pytest.mark.parametrize(
    "fishers, kwargs, match",
    [
        ([_A], {}, "2 models but 1 fishers"),
        ([_A, {"params": {"dense": {"kernel": np.ones((2, 4), np.float32)}}}], {},
         r"fishers\[1\] does not match models\[1\]: .*params/dense/kernel: \(2, 3\) vs \(2, 4\)"),
        ([_A, {"params": {"dense": {"bias": np.ones(3, np.float32)}}}], {},
         r"fishers\[1\] does not match models\[1\]: .*params/dense/kernel"),
        ([_A, {"params": {"dense": {"kernel": np.full((2, 3), -1e-3, np.float32)}}}], {},
         r"fishers\[1\]: params/dense/kernel has negative entries"),
        ([{"params": {"dense": {"kernel": np.full((2, 3), np.nan, np.float32)}}}, _A], {},
         r"fishers\[0\]: params/dense/kernel has 6 NaN"),
        ([_A, {"params": {"dense": {"kernel": np.full((2, 3), np.inf, np.float32)}}}], {},
         r"fishers\[1\]: params/dense/kernel has 0 NaN and 6 Inf"),
        ([_A, _A], {"weights": [1.0]}, r"2 models but weights of shape \(1,\)"),
        ([_A, _A], {"weights": [1.0, -1.0]}, "non-negative"),
        ([_A, _A], {"epsilon": 0.0}, "epsilon must be finite and > 0"),
        ([_A, _A], {"epsilon": float("inf")}, "epsilon must be finite and > 0"),
    ],
)
def test_bad_input_is_a_clear_error(fishers, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.fisher([_A, _B], fishers, **kwargs)


def test_mismatched_models_name_the_path():
  wider = {"params": {"dense": {"kernel": np.zeros((2, 4), np.float32)}}}
  with pytest.raises(ValueError, match="need at least one model"):
    mj.merge.fisher([], [])
  with pytest.raises(ValueError, match=r"params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
    mj.merge.fisher([_A, wider], [_A, wider])
