"""Tests for mergejax.merge.sce: SCE against a NumPy transcription of its
steps, its identities, and its errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_task_vectors import _leaves
from tests.test_task_vectors import _unflatten
from tests.test_task_vectors import assert_merges_leaf_by_leaf
from tests.test_task_vectors import BAD_INPUT_BASE
from tests.test_task_vectors import BAD_INPUT_MODEL
from tests.test_task_vectors import BAD_INPUT_WIDER
from tests.test_task_vectors import base_and_models
from tests.test_task_vectors import reference_k
from tests.test_task_vectors import reference_task_vectors


def reference_sce_leaf(taus, density):
  """Select, calculate, erase at one leaf; taus: f64[N, *shape]."""
  n = len(taus)
  variance = taus.var(axis=0)
  k = reference_k(density, variance.size)
  threshold = np.sort(variance.ravel())[::-1][k - 1]
  selected = np.where(variance >= threshold, taus, 0.0)
  energy = np.array([np.sum(t**2) for t in selected])
  eta = energy / energy.sum() if energy.sum() > 0 else np.full(n, 1 / n)
  elected = np.where(selected.sum(axis=0) >= 0, 1.0, -1.0)
  merged = np.zeros(variance.shape)
  for index in np.ndindex(variance.shape):
    column = selected[(slice(None),) + index]
    survives = np.sign(column) == elected[index]
    if survives.any():
      merged[index] = np.sum(eta[survives] * column[survives]) / np.sum(eta[survives])
  return merged


def reference_sce(base, models, density, scale):
  taus = reference_task_vectors(base, models)
  return _unflatten(base, [
      b + scale * reference_sce_leaf(np.stack([t[j] for t in taus]).astype(np.float64), density)
      for j, (_, b) in enumerate(_leaves(base))
  ])


densities = st.floats(0.01, 1.0)


@hypothesis.settings(max_examples=6)
@hypothesis.given(base_and_models(discrete=False), densities, st.floats(-2.0, 2.0), st.integers(0, 3))
def test_sce_matches_numpy_in_any_model_order(case, density, scale, shift):
  base, models = case
  want = reference_sce(base, models, density, scale)
  assert_trees_close(mj.merge.sce(base, models, density=density, scale=scale), want)
  shift %= len(models)
  rotated = models[shift:] + models[:shift]
  assert_trees_close(mj.merge.sce(base, rotated, density=density, scale=scale), want)


@hypothesis.settings(max_examples=4)
@hypothesis.given(base_and_models(), st.integers(2, 4), densities)
def test_copies_of_one_model_and_one_model_merge_to_it(case, n, density):
  base, (model, *_) = case
  # Every variance is 0, so every entry is selected at any density.
  assert_trees_close(mj.merge.sce(base, [model] * n, density=density), model)
  assert_trees_close(mj.merge.sce(base, [model], density=density), model)


def test_sce_by_hand():
  base = {"w": np.zeros(4, np.float32)}
  models = [{"w": np.array([3, 1, 0, 1], np.float32)},
            {"w": np.array([-1, 1, 0, 3], np.float32)}]
  # Variances 4, 0, 0, 1: density 0.5 keeps entries 0 and 3. Sums of squares
  # of the selected 9 + 1 and 1 + 9: eta = (1/2, 1/2). Entry 0: sum 2 elects
  # +, only model 0 survives. Entry 3: both +, mean 2. Entries 1, 2: erased.
  np.testing.assert_allclose(mj.merge.sce(base, models, density=0.5)["w"], [3, 0, 0, 2])
  # At density 1 everything is selected: entry 1 both 1, entry 2 nobody.
  np.testing.assert_allclose(mj.merge.sce(base, models)["w"], [3, 1, 0, 2])


def test_sce_coefficients_weight_the_survivors():
  base = {"w": np.zeros(2, np.float32)}
  models = [{"w": np.array([1, 1], np.float32)}, {"w": np.array([3, 3], np.float32)}]
  # eta = (2, 18) / 20: each entry is 0.1 * 1 + 0.9 * 3.
  np.testing.assert_allclose(mj.merge.sce(base, models)["w"], [2.8, 2.8], rtol=1e-6)


def test_sce_zero_sum_elects_plus_and_keeps_variance_ties():
  base = {"w": np.zeros(3, np.float32)}
  models = [{"w": np.array([2, -2, 1], np.float32)}, {"w": np.array([-2, 2, 0], np.float32)}]
  # Variances 4, 4, 1/4: density 1/3 keeps k = 1 entry and its tie. The
  # sums are 0, so + is elected: the positive entry survives alone.
  np.testing.assert_allclose(mj.merge.sce(base, models, density=1 / 3)["w"], [2, 2, 0])


@hypothesis.settings(max_examples=3)
@hypothesis.given(base_and_models(discrete=False), densities)
def test_one_leaf_at_a_time_reproduces_the_whole_merge(case, density):
  base, models = case
  assert_merges_leaf_by_leaf(lambda b, ms: mj.merge.sce(b, ms, density=density), base, models)


def test_sce_keeps_the_base_dtypes():
  base = {"w": jnp.zeros(8, jnp.bfloat16)}
  models = [{"w": jnp.ones(8, jnp.bfloat16)}, {"w": jnp.full(8, 2, jnp.bfloat16)}]
  assert mj.merge.sce(base, models, density=0.5)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "models, kwargs, match",
    [
        ([], {}, "need at least one model"),
        ([BAD_INPUT_MODEL, BAD_INPUT_WIDER], {}, r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"),
        ([BAD_INPUT_MODEL], {"density": 0.0}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"density": 1.5}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"scale": float("nan")}, "scale must be finite"),
    ],
)
def test_bad_arguments_are_named(models, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.sce(BAD_INPUT_BASE, models, **kwargs)
