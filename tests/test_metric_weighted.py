"""Tests for mergejax.merge.metric_weighted: metrics-weighted averaging against
NumPy, its identities, and its errors."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_average import average_reference
from tests.test_average import pytrees


def reference_weights(metrics, penalty, lower_is_better):
  """m ** -p (or m ** p), normalised, in float64."""
  m = np.asarray(metrics, np.float64)
  w = m ** (-penalty if lower_is_better else penalty)
  return w / w.sum()


metrics = st.lists(st.floats(0.05, 20.0), min_size=4, max_size=4)


@hypothesis.given(metrics, st.floats(0.0, 5.0), st.booleans())
def test_metric_weights_match_numpy(ms, penalty, lower_is_better):
  np.testing.assert_allclose(
      mj.merge.metric_weights(ms, penalty=penalty, lower_is_better=lower_is_better),
      reference_weights(ms, penalty, lower_is_better),
      rtol=1e-5, atol=1e-7,
  )


@hypothesis.settings(max_examples=5)
@hypothesis.given(pytrees(3, discrete=False), metrics, st.floats(0.0, 3.0), st.booleans())
def test_metric_weighted_average_matches_numpy(models, ms, penalty, lower_is_better):
  ms = ms[:3]
  assert_trees_close(
      mj.merge.metric_weighted_average(models, ms, penalty=penalty, lower_is_better=lower_is_better),
      average_reference(models, reference_weights(ms, penalty, lower_is_better)),
  )


@hypothesis.settings(max_examples=5)
@hypothesis.given(pytrees(3, discrete=False), st.floats(0.05, 20.0), st.floats(0.0, 5.0))
def test_equal_metrics_or_zero_penalty_give_the_plain_average(models, metric, penalty):
  plain = average_reference(models, None)
  assert_trees_close(mj.merge.metric_weighted_average(models, [metric] * 3, penalty=penalty), plain)
  assert_trees_close(mj.merge.metric_weighted_average(models, [0.5, 1.0, 2.0], penalty=0.0), plain)


def test_a_large_penalty_puts_the_weight_on_the_best_model():
  losses, steps = [0.9, 0.3, 0.31], [100, 300, 200]
  np.testing.assert_allclose(mj.merge.metric_weights(losses, penalty=1e4), [0, 1, 0], atol=1e-6)
  np.testing.assert_allclose(
      mj.merge.metric_weights(steps, penalty=1e4, lower_is_better=False), [0, 1, 0], atol=1e-6
  )
  models = [{"w": np.full(3, float(i), np.float32)} for i in range(3)]
  np.testing.assert_allclose(mj.merge.metric_weighted_average(models, losses, penalty=1e4)["w"], 1.0)
  # A moderate penalty orders the weights by the metric.
  w = mj.merge.metric_weights(losses, penalty=2.0)
  assert w[1] > w[2] > w[0]


@pytest.mark.parametrize(
    "metrics, kwargs, match",
    [
        ([1.0, 2.0, 3.0], {}, r"2 models but metrics of shape \(3,\)"),
        ([1.0, 0.0], {}, "metrics must be finite and > 0"),
        ([1.0, -2.0], {}, "metrics must be finite and > 0"),
        ([1.0, float("nan")], {}, "metrics must be finite and > 0"),
        ([1.0, 2.0], {"penalty": -1.0}, "penalty must be finite and >= 0"),
        ([1.0, 2.0], {"penalty": float("inf")}, "penalty must be finite and >= 0"),
    ],
)
def test_bad_arguments_are_named(metrics, kwargs, match):
  models = [{"w": np.zeros(2, np.float32)}] * 2
  with pytest.raises(ValueError, match=match):
    mj.merge.metric_weighted_average(models, metrics, **kwargs)


def test_bad_models_and_empty_metrics_are_named():
  with pytest.raises(ValueError, match="need at least one model"):
    mj.merge.metric_weighted_average([], [])
  with pytest.raises(ValueError, match=r"w: \(2,\) vs \(3,\)"):
    mj.merge.metric_weighted_average(
        [{"w": np.zeros(2, np.float32)}, {"w": np.zeros(3, np.float32)}], [1.0, 1.0])
  with pytest.raises(ValueError, match="need a non-empty list"):
    mj.merge.metric_weights([], penalty=1.0)
