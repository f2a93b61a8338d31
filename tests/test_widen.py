"""Tests for mergejax.merge.widen: WIDEN against a NumPy transcription of the
authors' algorithm, its identities, its axis conventions, and its errors."""

import importlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_pcb import base_and_models
from tests.test_task_vectors import _leaves
from tests.test_task_vectors import _unflatten
from tests.test_task_vectors import assert_merges_leaf_by_leaf
from tests.test_task_vectors import BAD_INPUT_BASE
from tests.test_task_vectors import BAD_INPUT_MODEL
from tests.test_task_vectors import BAD_INPUT_WIDER

# mj.merge.widen is the function; the module holds default_axes.
widen_lib = importlib.import_module("mergejax.merge.widen")


def _importance(significance, t, s):
  """Softmax over the models (axis 0), s where above t times the row mean."""
  e = np.exp(significance - significance.max(axis=0))
  scores = e / e.sum(axis=0)
  return np.where(significance > t * significance.mean(axis=1, keepdims=True), s, scores)


def _ranks(changes):
  """Each row's entries ranked (stable, smallest 0) and divided by the count."""
  order = np.argsort(changes, axis=1, kind="stable")
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(changes.shape[1])[None], axis=1)
  return ranks / changes.shape[1]


def reference_widen_leaf(b, xs, axes, t, s):
  """WIDEN at one leaf in float64; axes: the column-norm axes or None."""
  taus = np.stack([(x - b) for x in xs]).astype(np.float64)  # float32 differences.
  b, xs = b.astype(np.float64), np.stack(xs).astype(np.float64)
  n = len(xs)
  if axes is None:
    weights = _importance(np.abs(taus).reshape(n, -1), t, s).reshape(taus.shape)
  else:
    model_axes = tuple(a + 1 for a in axes)
    base_norm = np.sqrt((b * b).sum(axis=axes, keepdims=True))
    norms = np.sqrt((xs * xs).sum(axis=model_axes, keepdims=True))
    products = norms * base_norm[None]
    dots = (xs * b[None]).sum(axis=model_axes, keepdims=True)
    cosines = np.where(products > 0, dots / np.where(products > 0, products, 1), 0.0)
    magnitude = np.abs(norms - base_norm[None]).reshape(n, -1)
    direction = (1 - cosines).reshape(n, -1)
    weights = 0.5 * (_importance(_ranks(magnitude), t, s) + _importance(_ranks(direction), t, s))
    weights = weights.reshape(norms.shape)
  return b + (weights * taus).sum(axis=0)


def reference_widen(base, models, t, s, axes_by_path=None):
  axes_by_path = axes_by_path or {}
  model_leaves = [_leaves(m) for m in models]
  merged = []
  for j, (path, b) in enumerate(_leaves(base)):
    axes = axes_by_path.get(path, (b.ndim - 1,) if b.ndim >= 2 else None)
    merged.append(reference_widen_leaf(b, [ls[j][1] for ls in model_leaves], axes, t, s))
  return _unflatten(base, merged)


ratios = st.floats(0.0, 2.5)
scores = st.floats(0.0, 1.5)


@hypothesis.settings(max_examples=8)
@hypothesis.given(base_and_models(discrete=False), ratios, scores)
def test_widen_matches_numpy(case, t, s):
  base, models = case
  assert_trees_close(
      mj.merge.widen(base, models, above_average_ratio=t, calibrated_score=s),
      reference_widen(base, models, t, s),
  )


@hypothesis.settings(max_examples=4)
@hypothesis.given(base_and_models(discrete=False), st.sampled_from([None, 0, (0, 1)]))
def test_axis_overrides_match_numpy(case, kernel_axes):
  base, models = case
  by_path = {"block/kernel": kernel_axes, "bias": 0}
  kernel_tuple = (0,) if kernel_axes == 0 else kernel_axes
  want = reference_widen(base, models, 1.0, 0.5, {"block/kernel": kernel_tuple, "bias": (0,)})
  by_mapping = mj.merge.widen(base, models, calibrated_score=0.5, axis=by_path)
  by_callable = mj.merge.widen(
      base, models, calibrated_score=0.5,
      axis=lambda path, leaf: by_path.get(path, widen_lib.default_axes(leaf)),
  )
  assert_trees_close(by_mapping, want)
  assert_trees_close(by_callable, by_mapping, rtol=0, atol=0)


@hypothesis.settings(max_examples=6)
@hypothesis.given(base_and_models(), ratios)
def test_identities(case, t):
  base, models = case
  n = len(models)
  # Models equal to the base: every task vector is 0, whatever the scores.
  assert_trees_close(mj.merge.widen(base, [base] * n, above_average_ratio=t), base, rtol=0, atol=0)
  # One model has score 1 everywhere (its softmax, or s = 1): it comes back.
  assert_trees_close(mj.merge.widen(base, models[:1], above_average_ratio=t), models[0])
  # N copies score 1/N each, so with s = 1/N they give back the model.
  copies = mj.merge.widen(base, [models[0]] * n, above_average_ratio=t, calibrated_score=1 / n)
  assert_trees_close(copies, models[0])


@hypothesis.settings(max_examples=3)
@hypothesis.given(base_and_models(discrete=False))
def test_one_leaf_at_a_time_reproduces_the_whole_merge(case):
  base, models = case
  axis = {"block/kernel": (0, 1)}
  # The whole merge takes every axis; a one-leaf merge only its own leaf's.
  assert_merges_leaf_by_leaf(
      lambda b, ms, axis=axis: mj.merge.widen(b, ms, axis=axis), base, models,
      leaf_kwargs=lambda path: {"axis": {p: a for p, a in axis.items() if p == path}},
  )


def test_calibration_replaces_the_softmax_above_t_times_the_mean():
  base = {"b": np.zeros(4, np.float32)}
  model = {"b": np.array([1, 2, 3, 6], np.float32)}
  # One model: softmax 1 everywhere; |tau| above 1.0 * mean(|tau|) = 3 (only
  # the 6) gets s = 0.5 instead, and above 0.5 * 3 (2, 3 and 6) with t = 0.5.
  np.testing.assert_allclose(mj.merge.widen(base, [model], calibrated_score=0.5)["b"], [1, 2, 3, 3])
  np.testing.assert_allclose(
      mj.merge.widen(base, [model], above_average_ratio=0.5, calibrated_score=0.5)["b"],
      [1, 1, 1.5, 3],
  )


def test_a_dense_kernel_has_one_column_per_input_unit():
  # Kernel [in=2, out=2]. Each model moves one input row; the other scores
  # lower (rank 0) in both magnitude and direction, and with t = 2 nothing is
  # calibrated: each row takes softmax([1/2, 0]) of the model that moved it.
  base = {"kernel": np.eye(2, dtype=np.float32)}
  models = [{"kernel": np.array([[3, 1], [0, 1]], np.float32)},
            {"kernel": np.array([[1, 0], [1, 4]], np.float32)}]
  merged = mj.merge.widen(base, models, above_average_ratio=2.0)["kernel"]
  high = 1 / (1 + np.exp(-0.5))
  np.testing.assert_allclose(merged, [[1 + 2 * high, high], [high, 1 + 3 * high]], rtol=1e-6)


@pytest.mark.parametrize(
    "shape, axes",
    [((3, 4), (1,)), ((3, 3, 2, 5), (3,)), ((7, 16), (1,)), ((4,), None), ((), None)],
)
def test_default_axes(shape, axes):
  assert widen_lib.default_axes(np.zeros(shape)) == axes


def test_widen_keeps_the_base_dtypes():
  base = {"w": jnp.zeros((2, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
  models = [jax.tree.map(lambda x: x + 1, base), jax.tree.map(lambda x: x + 2, base)]
  merged = mj.merge.widen(base, models)
  assert merged["w"].dtype == merged["b"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "models, kwargs, match",
    [
        ([], {}, "need at least one model"),
        ([BAD_INPUT_MODEL, BAD_INPUT_WIDER], {}, r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"),
        ([BAD_INPUT_MODEL], {"above_average_ratio": float("nan")}, "above_average_ratio must be finite"),
        ([BAD_INPUT_MODEL], {"calibrated_score": float("inf")}, "calibrated_score must be finite"),
        ([BAD_INPUT_MODEL], {"axis": {"params/dense/bias": 0}}, "'params/dense/bias' is not a leaf path"),
        ([BAD_INPUT_MODEL], {"axis": {"params/dense/kernel": 2}}, r"axis of params/dense/kernel: \(2,\) is not"),
        ([BAD_INPUT_MODEL], {"axis": {"params/dense/kernel": ()}}, r"axis of params/dense/kernel: \(\) is not"),
        ([BAD_INPUT_MODEL], {"axis": {"params/dense/kernel": (1, -1)}}, "repeats an axis"),
        ([BAD_INPUT_MODEL], {"axis": lambda path, leaf: 5}, r"axis of params/dense/kernel: \(5,\)"),
    ],
)
def test_bad_arguments_are_rejected(models, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.widen(BAD_INPUT_BASE, models, **kwargs)
