"""Tests for mergejax.lmc: interpolation curves and Git Re-Basin's barrier."""

import numpy as np
import pytest

from mergejax import lmc


def test_interpolate_evaluates_the_straight_path():
  va = {"w": np.array([0.0, 2.0], np.float32)}
  vb = {"w": np.array([4.0, -2.0], np.float32)}
  curve = lmc.interpolate(lambda v: {"first": v["w"][0], "sum": v["w"].sum()}, va, vb, num=5)
  np.testing.assert_allclose(curve.t, [0, 0.25, 0.5, 0.75, 1])
  np.testing.assert_allclose(curve.values["first"], 4 * curve.t, atol=1e-6)
  np.testing.assert_allclose(curve.values["sum"], 2.0, atol=1e-6)


def test_transform_sees_each_point_and_its_t():
  seen = []
  va, vb = {"w": np.zeros(1, np.float32)}, {"w": np.ones(1, np.float32)}

  def transform(v, t):
    seen.append(t)
    return {"w": v["w"] * 0}

  curve = lmc.interpolate(lambda v: float(v["w"][0]), va, vb, num=3, transform=transform)
  assert seen == [0.0, 0.5, 1.0]
  np.testing.assert_array_equal(curve.values["value"], 0.0)


def test_barrier_is_the_rise_above_the_line_between_the_ends():
  t = np.linspace(0, 1, 5)
  bump = lmc.Curve(t, {"loss": np.array([1.0, 2.5, 4.0, 2.5, 3.0])})
  # The line from 1 to 3 is 2 at t = 0.5: the barrier is 4 - 2.
  assert lmc.barrier(bump) == pytest.approx(2.0)
  assert lmc.barrier(lmc.Curve(t, {"loss": 1 + 2 * t})) == pytest.approx(0.0)
  assert lmc.barrier(lmc.Curve(t, {"loss": (t - 0.5) ** 2})) == pytest.approx(0.0)


def test_errors():
  va = {"w": np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match="num must be at least 2"):
    lmc.interpolate(lambda v: 0.0, va, va, num=1)
  with pytest.raises(ValueError, match="w"):
    lmc.interpolate(lambda v: 0.0, va, {"w": np.zeros(3, np.float32)})
  curve = lmc.Curve(np.linspace(0, 1, 3), {"loss": np.zeros(3), "acc": np.ones(3)})
  with pytest.raises(ValueError, match="name one"):
    lmc.barrier(curve)
  with pytest.raises(ValueError, match="no metric 'err'"):
    lmc.barrier(curve, "err")
