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


def _exact_losses(convex):
  """c f[S, n] -> f64[S, T]: the convex quadratics (P, m, k) at every c."""
  return lambda c: np.stack([np.einsum("si,ik,sk->s", c - m, p, c - m) + k for p, m, k in convex], axis=1)


def _angles(c):
  """The hyperspherical angles phi_k = atan2(|c_{k+1:}|, c_k) of c: f[S, n]."""
  tail = np.sqrt(np.cumsum(np.square(c[:, ::-1]), axis=1)[:, ::-1])
  return np.arctan2(tail[:, 1:], c[:, :-1])


def test_sampling_probabilities_are_the_softmax_of_each_cells_error_bound():
  rng = np.random.default_rng(4)
  convex = [_convex(rng, 2, [0.3, 0.2], 0.0), _convex(rng, 2, [0.1, 0.6], 0.0)]
  surrogates = _surrogates_of(convex)
  bins, width = 4, np.pi / 8
  # Two points in each of cells 0, 1 and 2 (cell 3 empty), radius 0.5.
  phi = width * np.array([0.25, 0.75, 1.25, 1.75, 2.5, 2.9])
  c = 0.5 * np.column_stack([np.cos(phi), np.sin(phi)])
  exact = _exact_losses(convex)(c)
  # No error anywhere: every direction is as likely.
  np.testing.assert_allclose(mj.merge.map_sampling_probabilities(surrogates, c, exact, bins=bins), 0.25)
  # Squared errors (summed over tasks) 0, 0 | 0.01, 0.04 | 0.09, 0.25.
  noise = np.array([[0, 0], [0, 0], [0.1, 0], [0, 0.2], [0.3, 0], [0.4, 0.3]])
  tradeoff, temperature = 0.5, 0.07
  probabilities = mj.merge.map_sampling_probabilities(surrogates, c, exact + noise, bins=bins, tradeoff=tradeoff,
                                                      temperature=temperature)
  errors = np.sum(noise ** 2, axis=1).reshape(3, 2)
  scores = errors.mean(1) + tradeoff * errors.std(1)
  scores = np.append(scores, scores.max())  # the empty cell scores as the worst
  expected = np.exp(scores / (scores.max() * temperature))
  np.testing.assert_allclose(probabilities, expected / expected.sum(), rtol=1e-9)
  assert probabilities.shape == (bins,) and probabilities[2] == probabilities[3] > probabilities[1]

  # Three coefficients: one erring point makes its cell (i, j) of the two angles the likeliest, with the
  # cells no sample fell in.
  convex3 = [_convex(rng, 3, [0.2, 0.3, 0.1], 0.0)]
  c3 = rng.uniform(0, 1, size=(40, 3))
  losses3 = _exact_losses(convex3)(c3)
  losses3[7] += 1.0
  p3 = mj.merge.map_sampling_probabilities(_surrogates_of(convex3), c3, losses3, bins=3)
  cells = [tuple(ij) for ij in np.floor(_angles(c3) / (np.pi / 6)).astype(int)]
  likeliest = {(i, j) for i in range(3) for j in range(3) if p3[i, j] == p3.max()}
  assert p3.shape == (3, 3) and likeliest == {cells[7]} | ({(i, j) for i in range(3) for j in range(3)} - set(cells))
  assert len(likeliest) < 9
  np.testing.assert_allclose(p3.sum(), 1)


def test_sample_draws_each_cells_angles_and_radii_within_range_deterministically():
  key = jax.random.key(0)
  one_hot = np.zeros((3, 3))
  one_hot[1, 2] = 1
  c = mj.merge.map_sample(key, one_hot, 200, radius=(0.3, 0.7))
  phi = _angles(c)
  width = np.pi / 6
  assert c.shape == (200, 3) and np.all(c >= 0)
  assert np.all((phi[:, 0] >= width) & (phi[:, 0] <= 2 * width))
  assert np.all((phi[:, 1] >= 2 * width) & (phi[:, 1] <= 3 * width))
  radius = np.linalg.norm(c, axis=1)
  assert np.all((radius >= 0.3) & (radius <= 0.7)) and np.ptp(radius) > 0.3
  # Cells are drawn by their probabilities (4000 draws: within 4 binomial standard deviations).
  p = np.array([0.1, 0.2, 0.3, 0.4])
  draws = mj.merge.map_sample(key, p, 4000)
  counts = np.bincount(np.floor(_angles(draws)[:, 0] / (np.pi / 8)).astype(int), minlength=4)
  assert np.all(np.abs(counts - 4000 * p) < 4 * np.sqrt(4000 * p * (1 - p)))
  np.testing.assert_array_equal(mj.merge.map_sample(key, one_hot, 200, radius=(0.3, 0.7)), c)
  assert not np.allclose(mj.merge.map_sample(jax.random.key(1), one_hot, 200, radius=(0.3, 0.7)), c)


def test_bayesian_map_on_exact_quadratics_finds_the_analytic_front_with_fewer_evaluations_than_a_grid():
  rng = np.random.default_rng(5)
  n = 3
  convex = [_convex(rng, n, [0.2, 0.5, 0.1], 1.0), _convex(rng, n, [0.5, 0.1, 0.3], 0.5)]
  calls = []
  evaluate = lambda c: calls.append(len(c)) or _exact_losses(convex)(c)
  schedule = (10, 4, 4)  # 18 evaluations; a grid must have 3 values per axis (27) to fit c_i^2
  samples = mj.merge.map_bayesian(evaluate, jax.random.key(0), n, schedule, radius=(0.2, 1.0))
  assert calls == list(schedule) and samples.coefficients.shape == (18, n) and samples.losses.shape == (18, 2)
  np.testing.assert_array_equal(samples.rounds, np.repeat([0, 1, 2], schedule))
  np.testing.assert_allclose(samples.losses, _exact_losses(convex)(samples.coefficients))
  w = mj.merge.map_preferences(2, 6)
  front = mj.merge.map_pareto_front(mj.merge.map_surrogates(samples.coefficients, samples.losses), w)
  analytic = mj.merge.map_pareto_front(_surrogates_of(convex), w)
  np.testing.assert_allclose(front.coefficients, analytic.coefficients, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(front.losses, analytic.losses, rtol=1e-8, atol=1e-10)
  # The same key draws the same merges; another key other merges, with the same exact front.
  again = mj.merge.map_bayesian(evaluate, jax.random.key(0), n, schedule, radius=(0.2, 1.0))
  np.testing.assert_array_equal(again.coefficients, samples.coefficients)
  other = mj.merge.map_bayesian(evaluate, jax.random.key(1), n, schedule, radius=(0.2, 1.0))
  assert not np.allclose(other.coefficients, samples.coefficients)
  other_front = mj.merge.map_pareto_front(mj.merge.map_surrogates(other.coefficients, other.losses), w)
  np.testing.assert_allclose(other_front.coefficients, analytic.coefficients, rtol=1e-8, atol=1e-10)


def test_bayesian_map_samples_where_the_surrogates_fit_worst():
  # A quadratic plus a term that is 0 outside the first angular cell (phi < pi / 8: c_1 < tan(pi/8) c_0):
  # the fit errs most there, and the next round samples mostly there.
  p, m = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([0.3, 0.4])

  def evaluate(c):
    q = np.einsum("si,ik,sk->s", c - m, p, c - m)
    return np.column_stack([q + 20 * np.maximum(0, np.tan(np.pi / 8) * c[:, 0] - c[:, 1]) ** 2, q])

  samples = mj.merge.map_bayesian(evaluate, jax.random.key(2), 2, (12, 12), radius=(0.2, 1.0))
  first = samples.rounds == 0
  surrogates = mj.merge.map_surrogates(samples.coefficients[first], samples.losses[first])
  probabilities = mj.merge.map_sampling_probabilities(surrogates, samples.coefficients[first],
                                                      samples.losses[first])
  assert np.argmax(probabilities) == 0 and probabilities[0] > 0.5
  cells = np.floor(_angles(samples.coefficients)[:, 0] / (np.pi / 8)).astype(int)
  assert np.mean(cells[~first] == 0) > 0.5 > np.mean(cells[first] == 0)


def test_nested_map_on_four_exact_quadratics_merges_closest_pairs_by_their_fronts():
  rng = np.random.default_rng(6)
  t = 4
  convex = [_convex(rng, t, rng.uniform(0.1, 0.6, t), k) for k in (0.1, 0.9, 0.15, 1.0)]
  exact = _exact_losses(convex)
  scored = []
  evaluate = lambda c: scored.append(len(c)) or exact(c)
  samples, bounds = 8, (-4.0, 4.0)
  result = mj.merge.map_nested(evaluate, jax.random.key(0), t, samples=samples, divisions=12, bounds=bounds)
  assert len(result.steps) == t - 1
  assert result.evaluations == sum(scored) == t + (t - 1) * (samples + 1)
  # Groups: (tasks, coefficients u, score), first each task's own model; each step merges the closest scores.
  groups = [((i,), np.eye(t)[i], exact(np.eye(t))[i, i]) for i in range(t)]
  for step in result.steps:
    gaps = {(a[0], b[0]): abs(a[2] - b[2]) for k, a in enumerate(groups) for b in groups[k + 1:]}
    assert step.groups == min(gaps, key=gaps.get)
    (tasks_a, u_a, _), (tasks_b, u_b, _) = [next(g for g in groups if g[0] == s) for s in step.groups]
    u = np.column_stack([u_a, u_b])  # c = u (a, b)
    objectives = lambda ab, u=u, ta=tasks_a, tb=tasks_b: np.column_stack(
        [exact(ab @ u.T)[:, list(ta)].mean(1), exact(ab @ u.T)[:, list(tb)].mean(1)])
    front = step.front
    # The surrogates are exact: the front's predicted losses are the groups' mean losses there, and no
    # front point dominates another.
    np.testing.assert_allclose(front.losses, objectives(front.coefficients), rtol=1e-8, atol=1e-8)
    for k, row in enumerate(front.losses):
      others = np.delete(front.losses, k, axis=0)
      assert not np.any(np.all(others <= row, axis=1) & np.any(others < row, axis=1))
    # Equal preferences: the chosen point minimises |A| O_A + |B| O_B (weights on the 12-division grid),
    # in closed form as it lies inside the box.
    q = np.isin(np.arange(t), tasks_a + tasks_b).astype(float)  # |A| mean_A + |B| mean_B = sum over A and B
    hessian = sum(qj * pj for qj, (pj, _, _) in zip(q, convex))
    ab = np.linalg.solve(u.T @ hessian @ u, u.T @ sum(qj * pj @ mj_ for qj, (pj, mj_, _) in zip(q, convex)))
    assert np.all((ab > bounds[0]) & (ab < bounds[1]))
    np.testing.assert_allclose(front.coefficients[step.chosen], ab, atol=1e-5)
    np.testing.assert_allclose(step.coefficients, u @ front.coefficients[step.chosen], rtol=1e-12)
    tasks = tasks_a + tasks_b
    groups = [g for g in groups if g[0] not in step.groups] + [
        (tasks, step.coefficients, exact(step.coefficients[None])[0, list(tasks)].mean())]
  np.testing.assert_array_equal(result.coefficients, result.steps[-1].coefficients)
  # The same key gives the same merge; another samples other pairs but finds the same exact fronts.
  again = mj.merge.map_nested(evaluate, jax.random.key(0), t, samples=samples, divisions=12, bounds=bounds)
  np.testing.assert_array_equal(again.coefficients, result.coefficients)
  other = mj.merge.map_nested(evaluate, jax.random.key(1), t, samples=samples, divisions=12, bounds=bounds)
  np.testing.assert_allclose(other.coefficients, result.coefficients, atol=1e-5)
  # Preferences weigh the tasks: a heavy task pulls the final merge toward its own minimum.
  heavy = mj.merge.map_nested(evaluate, jax.random.key(0), t, samples=samples, divisions=12, bounds=bounds,
                              preferences=[20.0, 1.0, 1.0, 1.0])
  assert exact(heavy.coefficients[None])[0, 0] < exact(result.coefficients[None])[0, 0]


def test_adaptive_and_nested_bad_inputs():
  key = jax.random.key(0)
  evaluate = lambda c: np.zeros((len(c), 2))
  with pytest.raises(ValueError, match="first round must evaluate at least 10"):
    mj.merge.map_bayesian(evaluate, key, 3, (9, 5))
  with pytest.raises(ValueError, match=r"schedule\[1\] must be an integer >= 1"):
    mj.merge.map_bayesian(evaluate, key, 2, (6, 0))
  with pytest.raises(ValueError, match="num_coefficients must be an integer >= 2"):
    mj.merge.map_bayesian(evaluate, key, 1, (6,))
  with pytest.raises(ValueError, match=r"radius must be finite with low < high and low >= 0.0"):
    mj.merge.map_bayesian(evaluate, key, 2, (6,), radius=(0.5, 0.5))
  with pytest.raises(ValueError, match=r"evaluate returned shape \(6,\) for 6 coefficient vectors"):
    mj.merge.map_bayesian(lambda c: np.zeros(len(c)), key, 2, (6,))
  with pytest.raises(ValueError, match="probabilities must be non-negative and sum to 1"):
    mj.merge.map_sample(key, [0.5, 0.6], 3)
  with pytest.raises(ValueError, match="one axis of bins per angle"):
    mj.merge.map_sample(key, np.full((2, 3), 1 / 6), 3)
  rng = np.random.default_rng(7)
  c, y = rng.uniform(size=(10, 2)), rng.uniform(size=(10, 2))
  surrogates = mj.merge.map_surrogates(c, y)
  with pytest.raises(ValueError, match=r"losses have shape \(10, 3\); expected \(10, 2\)"):
    mj.merge.map_sampling_probabilities(surrogates, c, rng.uniform(size=(10, 3)))
  with pytest.raises(ValueError, match="temperature must be finite and > 0"):
    mj.merge.map_sampling_probabilities(surrogates, c, y, temperature=0.0)
  with pytest.raises(ValueError, match="samples must be an integer >= 6, got 5"):
    mj.merge.map_nested(evaluate, key, 2, samples=5)
  with pytest.raises(ValueError, match="preferences must be 2 finite values > 0"):
    mj.merge.map_nested(evaluate, key, 2, samples=6, preferences=[1.0, 0.0])
  with pytest.raises(ValueError, match=r"shape \(2, 3\) for 2 coefficient vectors; expected \(2, 2\)"):
    mj.merge.map_nested(lambda c: np.zeros((len(c), 3)), key, 2, samples=6)
  with pytest.raises(ValueError, match="bounds must be"):
    mj.merge.map_nested(evaluate, key, 2, samples=6, bounds=(1.0, 0.0))
