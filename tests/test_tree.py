"""Tests for mergejax.tree: arithmetic against NumPy, validation messages."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import tree as mt


@st.composite
def pytrees(draw, n: int = 1):
  """n random pytrees of one random structure: nested dicts/tuples of arrays."""
  num_leaves = draw(st.integers(1, 4))
  shapes = [
      tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
      for _ in range(num_leaves)
  ]
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  nested = draw(st.booleans())

  def make():
    leaves = [rng.normal(size=s).astype(np.float32) for s in shapes]
    if nested:
      return {"params": {f"layer_{i}": {"w": x} for i, x in enumerate(leaves)}}
    return tuple(leaves)

  return [make() for _ in range(n)]


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@hypothesis.given(pytrees(n=2), st.floats(-2, 2))
def test_lerp_endpoints_and_numpy(trees, t):
  a, b = trees
  np.testing.assert_array_equal(_flat(mt.lerp(a, b, 0.0)), _flat(a))
  np.testing.assert_allclose(_flat(mt.lerp(a, b, 1.0)), _flat(b), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      _flat(mt.lerp(a, b, t)), (1 - t) * _flat(a) + t * _flat(b), rtol=1e-5, atol=1e-5
  )


@hypothesis.given(pytrees(n=3), st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_weighted_sum_matches_numpy(trees, weights):
  expected = sum(w * _flat(t) for w, t in zip(weights, trees))
  got = _flat(mt.weighted_sum(trees, weights))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@hypothesis.given(pytrees(n=3), st.integers(0, 2))
def test_weighted_sum_one_hot_is_that_tree(trees, k):
  weights = [1.0 if i == k else 0.0 for i in range(3)]
  np.testing.assert_array_equal(_flat(mt.weighted_sum(trees, weights)), _flat(trees[k]))


@hypothesis.given(pytrees(n=2), st.floats(-3, 3))
def test_add_sub_scale_vdot_norm_match_numpy(trees, s):
  a, b = trees
  fa, fb = _flat(a), _flat(b)
  np.testing.assert_allclose(_flat(mt.add(a, b)), fa + fb, rtol=1e-6)
  np.testing.assert_allclose(_flat(mt.sub(a, b)), fa - fb, rtol=1e-6)
  np.testing.assert_allclose(_flat(mt.scale(a, s)), s * fa, rtol=1e-6)
  np.testing.assert_allclose(mt.vdot(a, b), fa @ fb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mt.global_norm(a), np.linalg.norm(fa), rtol=1e-5)
  assert mt.num_params(a) == fa.size
  assert jax.tree.structure(mt.add(a, b)) == jax.tree.structure(a)


def test_arithmetic_keeps_leaf_dtype():
  a = {"w": jnp.ones(3, jnp.bfloat16), "n": jnp.arange(3, dtype=jnp.int32)}
  b = {"w": jnp.zeros(3, jnp.bfloat16), "n": jnp.arange(3, dtype=jnp.int32)}
  for out in (mt.lerp(a, b, 0.5), mt.weighted_sum([a, b], [0.5, 0.5]), mt.scale(a, 2.0)):
    assert out["w"].dtype == jnp.bfloat16
    assert out["n"].dtype == jnp.int32


def test_weighted_sum_rejects_wrong_number_of_weights():
  with pytest.raises(ValueError, match="2 trees but 3 weights"):
    mt.weighted_sum([{"w": 1.0}, {"w": 2.0}], [1.0, 0.0, 0.0])


def _variables(out_features=10):
  return {
      "params": {
          "Dense_0": {"kernel": np.zeros((8, 64)), "bias": np.zeros(64)},
          "Dense_1": {"kernel": np.zeros((64, out_features)), "bias": np.zeros(out_features)},
      }
  }


def test_check_same_shapes_names_the_differing_leaf():
  with pytest.raises(ValueError, match=r"params/Dense_1/bias: \(10,\) vs \(12,\)"):
    mt.check_same_shapes(_variables(10), _variables(12))
  mt.check_same_shapes(_variables(), _variables())
  b = _variables()
  b["params"]["Dense_1"]["kernel"] = np.zeros((64, 12))
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel: \(64, 10\) vs \(64, 12\)"):
    mt.check_same_shapes(_variables(), b)


def test_check_same_shapes_dtypes():
  a = {"w": np.zeros(3, np.float32)}
  b = {"w": np.zeros(3, np.float16)}
  mt.check_same_shapes(a, b)
  with pytest.raises(ValueError, match="w: dtype float32 vs float16"):
    mt.check_same_shapes(a, b, dtypes=True)


def test_check_same_structure_names_missing_and_extra_leaves():
  a = _variables()
  b = _variables()
  del b["params"]["Dense_1"]["bias"]
  with pytest.raises(ValueError, match="params/Dense_1/bias: in tree 0, not in tree 1"):
    mt.check_same_structure(a, b)
  with pytest.raises(ValueError, match="params/Dense_1/bias: in tree 1, not in tree 0"):
    mt.check_same_structure(b, a)
  c = _variables()
  c["batch_stats"] = {"BatchNorm_0": {"mean": np.zeros(3)}}
  with pytest.raises(ValueError, match="batch_stats/BatchNorm_0/mean: in tree 2, not in tree 0"):
    mt.check_same_structure(a, a, c)


def test_check_same_structure_container_types():
  with pytest.raises(ValueError, match="different containers"):
    mt.check_same_structure((np.zeros(2), np.zeros(2)), [np.zeros(2), np.zeros(2)])


def test_arithmetic_validates_before_computing():
  with pytest.raises(ValueError, match="params/Dense_1/bias"):
    mt.add(_variables(10), _variables(12))


def test_check_finite_names_the_leaf():
  v = _variables()
  mt.check_finite(v)
  v["params"]["Dense_1"]["kernel"] = v["params"]["Dense_1"]["kernel"].copy()
  v["params"]["Dense_1"]["kernel"][0, :2] = [np.nan, np.inf]
  with pytest.raises(ValueError, match=r"model_b: params/Dense_1/kernel has 1 NaN and 1 Inf values \(of 640\)"):
    mt.check_finite(v, name="model_b")
  mt.check_finite({"step": np.int32(3), "mask": np.array([True])})
