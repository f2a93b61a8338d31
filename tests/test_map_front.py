"""Tests for mergejax.merge.map_front (MAP): exact quadratics are recovered, the front is the
weighted-sum minimisers and non-dominated, and losses are task arithmetic's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj


def _quadratic(rng, n):
  """A random exact quadratic: constant, linear f[n], symmetric f[n, n]."""
  a = rng.normal(size=(n, n))
  return rng.normal(), rng.normal(size=n), (a + a.T) / 2


def _convex(rng, n, centre, offset):
  """(c - centre)^T P (c - centre) + offset with P positive definite, as (P, centre, offset)."""
  a = rng.normal(size=(n, n))
  return a @ a.T + n * np.eye(n), np.asarray(centre, np.float64), offset


def _surrogates_of(convex):
  """The QuadraticSurrogates of convex quadratics (P, m, k): constant m'Pm + k, linear -2Pm, quadratic P."""
  return mj.merge.QuadraticSurrogates(
      np.array([m @ p @ m + k for p, m, k in convex]), np.stack([-2 * p @ m for p, m, _ in convex]),
      np.stack([p for p, _, _ in convex]))


def test_fit_recovers_an_exact_quadratic_and_predicts_the_samples():
  rng = np.random.default_rng(0)
  n = 3
  quadratics = [_quadratic(rng, n) for _ in range(2)]
  c = rng.uniform(-1, 2, size=(12, n))  # (n + 1)(n + 2) / 2 = 10 terms
  losses = np.stack([k + c @ b + np.einsum("si,ik,sk->s", c, a, c) for k, b, a in quadratics], axis=1)
  fit = mj.merge.map_surrogates(c, losses)
  np.testing.assert_allclose(fit.constant, [q[0] for q in quadratics], rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(fit.linear, [q[1] for q in quadratics], rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(fit.quadratic, [q[2] for q in quadratics], rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(mj.merge.map_predict(fit, c), losses, rtol=1e-9, atol=1e-9)
  # Least squares on noisy samples: the prediction is the projection, so residuals are orthogonal
  # to every monomial (here: to the constant and to each c_i).
  noisy = losses + rng.normal(scale=0.1, size=losses.shape)
  residual = noisy - mj.merge.map_predict(mj.merge.map_surrogates(c, noisy), c)
  np.testing.assert_allclose(np.column_stack([np.ones(len(c)), c]).T @ residual, 0, atol=1e-9)


def test_preferences_are_the_simplex_grid():
  w = mj.merge.map_preferences(3, 4)
  assert w.shape == (15, 3)  # C(4 + 2, 2)
  np.testing.assert_allclose(w.sum(1), 1)
  assert len({tuple(r) for r in w}) == 15 and np.all(w * 4 == np.round(w * 4))
  np.testing.assert_array_equal(mj.merge.map_preferences(2, 2), [[1, 0], [0.5, 0.5], [0, 1]])


def test_front_of_two_convex_quadratics_is_the_analytic_weighted_sum_minimisers():
  rng = np.random.default_rng(1)
  n = 3
  convex = [_convex(rng, n, [0.2, 0.5, 0.1], 1.0), _convex(rng, n, [0.9, 0.1, 0.6], 0.5)]
  surrogates = _surrogates_of(convex)
  w = mj.merge.map_preferences(2, 8)
  front = mj.merge.map_pareto_front(surrogates, w)
  (p1, m1, _), (p2, m2, _) = convex
  analytic = np.stack([np.linalg.solve(a * p1 + b * p2, a * p1 @ m1 + b * p2 @ m2) for a, b in w])
  # Every preference's minimiser is Pareto optimal (both quadratics strictly convex): all are kept.
  assert len(front.coefficients) == len(w)
  order = np.argsort([m @ p1 @ m for m in analytic - m1])  # by the first task's loss
  np.testing.assert_allclose(front.coefficients, analytic[order], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(front.preferences, w[order])
  np.testing.assert_allclose(front.losses, mj.merge.map_predict(surrogates, front.coefficients))
  # The corners are each task's own minimum.
  np.testing.assert_allclose(front.coefficients[0], m1, atol=1e-12)
  np.testing.assert_allclose(front.coefficients[-1], m2, atol=1e-12)
  # Non-dominated: along the front one task's loss rises exactly as the other's falls.
  assert np.all(np.diff(front.losses[:, 0]) > 0) and np.all(np.diff(front.losses[:, 1]) < 0)
  # A box holding every minimiser changes nothing; L-BFGS-B finds them to its tolerance.
  boxed = mj.merge.map_pareto_front(surrogates, w, bounds=(-1.0, 2.0))
  np.testing.assert_allclose(boxed.coefficients, front.coefficients, atol=1e-6)


def test_separable_front_in_a_box_is_the_clipped_minimiser_and_dominated_points_are_dropped():
  # Diagonal Hessians: the box-constrained minimiser is the unconstrained one, clipped.
  convex = [(np.diag([1.0, 2.0]), np.array([-0.5, 1.3]), 0.0), (np.diag([3.0, 1.0]), np.array([1.5, 1.4]), 0.0)]
  surrogates = _surrogates_of(convex)
  w = mj.merge.map_preferences(2, 10)
  front = mj.merge.map_pareto_front(surrogates, w, bounds=([0.0, 0.0], [1.0, 1.0]))
  (p1, m1, _), (p2, m2, _) = convex
  free = np.stack([np.linalg.solve(a * p1 + b * p2, a * p1 @ m1 + b * p2 @ m2) for a, b in w])
  clipped = np.clip(free, 0, 1)
  # Preferences whose clipped minimisers coincide give one point; any weakly dominated point goes.
  losses = mj.merge.map_predict(surrogates, clipped)
  expected = [p for p in range(len(w)) if not any(
      np.all(losses[q] <= losses[p]) and (np.any(losses[q] < losses[p]) or q < p) for q in range(len(w)) if q != p)]
  assert len(front.coefficients) == len(expected) < len(w)
  np.testing.assert_allclose(front.coefficients, clipped[expected][np.argsort(losses[expected, 0])], atol=1e-6)
  for p, row in enumerate(front.losses):
    others = np.delete(front.losses, p, axis=0)
    assert not np.any(np.all(others <= row, axis=1) & np.any(others < row, axis=1))


def test_losses_are_those_of_task_arithmetic():
  rng = np.random.default_rng(2)
  base = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}
  taus = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), base) for _ in range(2)]
  data = [[rng.normal(size=(4, 3)).astype(np.float32)], [rng.normal(size=(5, 3)).astype(np.float32)] * 2]
  loss_fn = lambda v, x: jnp.mean(jnp.square(x @ v["w"] + v["b"]))
  c = np.array([[0.0, 0.0], [0.3, 0.7], [1.0, -0.5], [0.4, 0.4]])
  losses = mj.merge.map_losses(loss_fn, base, taus, c, data)
  for s, row in enumerate(c):
    merged = jax.tree.map(lambda b, t0, t1, r=row: b + r[0] * t0 + r[1] * t1, base, *taus)
    expected = [np.mean([float(loss_fn(merged, x)) for x in batches]) for batches in data]
    np.testing.assert_allclose(losses[s], expected, rtol=1e-5)
  # Zero coefficients score the base; equal ones, task arithmetic at that scale.
  np.testing.assert_allclose(losses[0], [float(loss_fn(base, data[0][0])), float(loss_fn(base, data[1][0]))],
                             rtol=1e-6)
  arithmetic = mj.merge.task_arithmetic(base, [mj.tree.add(base, t) for t in taus], scale=0.4)
  np.testing.assert_allclose(losses[3], [float(loss_fn(arithmetic, d[0])) for d in data], rtol=1e-5)


def test_bad_inputs():
  rng = np.random.default_rng(3)
  c = rng.uniform(size=(10, 2))
  y = rng.uniform(size=(10, 2))
  with pytest.raises(ValueError, match="at least 6 samples, got 5"):
    mj.merge.map_surrogates(c[:5], y[:5])
  with pytest.raises(ValueError, match="coefficients has 10 rows but losses has 9"):
    mj.merge.map_surrogates(c, y[:9])
  with pytest.raises(ValueError, match="losses must be a non-empty 2-D array"):
    mj.merge.map_surrogates(c, y[:, 0])
  with pytest.raises(ValueError, match="losses has 1 non-finite"):
    mj.merge.map_surrogates(c, np.where(np.arange(20).reshape(10, 2) == 3, np.nan, y))
  with pytest.raises(ValueError, match="determine only"):
    mj.merge.map_surrogates(np.repeat(c[:1], 10, axis=0), y)
  surrogates = mj.merge.map_surrogates(c, y)
  indefinite = surrogates._replace(quadratic=np.stack([np.diag([1.0, -1.0])] * 2))
  with pytest.raises(ValueError, match=r"preferences\[0\] .* not positive definite"):
    mj.merge.map_pareto_front(indefinite, [[0.5, 0.5]])
  with pytest.raises(ValueError, match="on the simplex"):
    mj.merge.map_pareto_front(surrogates, [[0.7, 0.7]])
  with pytest.raises(ValueError, match="on the simplex"):
    mj.merge.map_pareto_front(surrogates, [[1.5, -0.5]])
  with pytest.raises(ValueError, match="preferences have 3 columns; there are 2"):
    mj.merge.map_pareto_front(surrogates, [[0.2, 0.3, 0.5]])
  with pytest.raises(ValueError, match="low < high"):
    mj.merge.map_pareto_front(surrogates, [[0.5, 0.5]], bounds=(1.0, 0.0))
  with pytest.raises(ValueError, match="bounds must be"):
    mj.merge.map_pareto_front(surrogates, [[0.5, 0.5]], bounds=1.0)
  with pytest.raises(ValueError, match="coefficients have 3 entries; the surrogates take 2"):
    mj.merge.map_predict(surrogates, np.zeros((1, 3)))
  with pytest.raises(ValueError, match="divisions must be an integer >= 1"):
    mj.merge.map_preferences(2, 0)
  base = {"w": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match="coefficients have 2 entries but there are 1 task vectors"):
    mj.merge.map_losses(lambda v, x: 0.0, base, [base], c, [[0]])
  with pytest.raises(ValueError, match=r"task_vectors\[1\] does not match base: .*w"):
    mj.merge.map_losses(lambda v, x: 0.0, base, [base, {"w": np.zeros((3, 2), np.float32)}], c, [[0]])
  with pytest.raises(ValueError, match="one non-empty sequence of batches per task"):
    mj.merge.map_losses(lambda v, x: 0.0, base, [base, base], c, [[0], []])
