"""Tests of mergejax.merge.evolutionary (M2N2) against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.merge import evolutionary


def _linear_apply(variables, x):
  return x @ variables["w"] + variables["b"]


def _tree(rng, scale=1.0):
  return {"b": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32),
          "w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32)}


def _flat(tree):
  """The parameter sequence in tree order (dict keys sorted: b then w)."""
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(4, 3))
  x = rng.normal(size=(48, 4)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=-1)
  population = [{"b": jnp.zeros(3), "w": jnp.asarray(teacher + 1.5 * rng.normal(size=(4, 3)),
                                                      jnp.float32)} for _ in range(4)]
  return population, x, y


@pytest.fixture(scope="module")
def runs(problem):
  """Two runs with one key and one with another; apply_fn traces counted."""
  population, x, y = problem
  traces = []

  def counted_apply(variables, inputs):
    traces.append(1)
    return _linear_apply(variables, inputs)

  first, again, other = (
      mj.merge.evolve(counted_apply, population, (x, y), generations=6,
                      key=jax.random.key(k), archive_size=3) for k in (3, 3, 4))
  return first, again, other, len(traces)


def test_split_merge_ends_are_parents_and_middle_is_numpy_piecewise_mix():
  rng = np.random.default_rng(1)
  a, b = _tree(rng), _tree(rng)
  p = evolutionary.num_parameters(a)
  assert p == 15
  for got, want in [(mj.merge.split_merge(a, b, p, 1.0), a),
                    (mj.merge.split_merge(a, b, 0, 1.0), b)]:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(g, w)
  fa, fb = _flat(a), _flat(b)
  merge = jax.jit(mj.merge.split_merge)
  for split, r in [(5, 0.3), (11, 0.8), (0, 0.25)]:
    want = np.where(np.arange(p) < split, r * fa + (1 - r) * fb, (1 - r) * fa + r * fb)
    got = merge(a, b, jnp.int32(split), jnp.float32(r))
    np.testing.assert_allclose(_flat(got), want, rtol=1e-6, atol=1e-6)
  assert merge._cache_size() == 1


def test_shared_fitness_matches_numpy():
  scores = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 1, 1], [0, 0, 1, 1, 1]], np.float32)
  capacity = np.array([1.0, 2.0, 1.0, 0.5, 1.0], np.float32)
  total = scores.sum(0)
  for alpha in (0.0, 0.5, 1.0, 2.0):
    want = (capacity * scores / (total + 1e-8) ** alpha).sum(1)
    got = mj.merge.shared_fitness(scores, alpha=alpha, capacity=capacity)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(mj.merge.shared_fitness(scores, alpha=0.0), scores.sum(1))
  # Models 0 and 2 solve three examples each; only model 2 solves one alone,
  # so competition ranks it above model 0.
  scores = np.array([[1, 1, 0, 0, 1], [1, 1, 0, 1, 0], [0, 0, 1, 1, 1]], np.float32)
  fitness = mj.merge.shared_fitness(scores, alpha=1.0)
  np.testing.assert_allclose(fitness, [1.5, 1.5, 2.0], rtol=1e-6)


def test_attraction_picks_the_complementary_partner():
  scores = np.array([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 0]], np.float32)
  total = scores.sum(0)
  for first in range(4):
    want = (np.maximum(scores - scores[first], 0) / (total + 1e-8)).sum(1)
    got = mj.merge.attraction(scores, first)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[first] == 0
  # Model 0 fails examples 2 and 3; model 2 solves both, the others one each.
  assert int(np.argmax(mj.merge.attraction(scores, 0))) == 2


def test_evolve_keeps_its_best_and_returns_it(problem, runs):
  population, x, y = problem
  (best, history), _, _, _ = runs
  initial = [float(np.mean(np.argmax(_linear_apply(m, x), -1) == y)) for m in population]
  assert history.best_score[0] == pytest.approx(max(initial))
  assert np.all(np.diff(history.best_score) >= 0)
  assert history.best_score.shape == (7,) and history.parents.shape == (6, 2)
  assert np.all(history.parents[:, 0] != history.parents[:, 1])
  assert np.all((history.split >= 0) & (history.split <= 15))
  assert np.all((history.ratio >= 0) & (history.ratio <= 1))
  accuracy = float(np.mean(np.argmax(_linear_apply(best, x), -1) == y))
  assert accuracy == pytest.approx(history.best_score[-1])
  assert history.archive_scores.shape == (3,)
  assert history.archive_scores.max() == pytest.approx(history.best_score[-1])


def test_evolve_is_deterministic_and_compiles_once(runs):
  (best, history), (best2, history2), (_, other), traces = runs
  for field in history._fields:
    np.testing.assert_array_equal(getattr(history, field), getattr(history2, field))
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(best2)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(history.split, other.split)
  # One trace for scoring the population, one for the generation step:
  # three runs of six children, each with its own split point and ratio,
  # did not recompile.
  assert traces == 2


def test_evolve_accepts_a_score_fn_and_random_mates(problem):
  population, _, _ = problem
  target = population[0]

  def score_fn(variables):  # per-parameter closeness to model 0
    return jnp.exp(-jnp.abs(variables["w"] - target["w"]).ravel())

  best, history = mj.merge.evolve(None, population, score_fn, generations=2,
                                  key=jax.random.key(0), mate="random", alpha=0.0)
  assert history.best_score[0] == pytest.approx(1.0)
  np.testing.assert_array_equal(best["w"], target["w"])


def _identity_scores(variables):
  return variables["s"]


def test_elitism_keeps_the_best_mean_score_that_competition_would_drop():
  # g solves the three crowded examples, each specialist one crowded and one
  # of its own: with alpha = 2 g has the lowest shared fitness but the best
  # mean score, so the archive of 3 drops a specialist rather than g.
  g = [1, 1, 1, 0, 0, 0]
  specialists = [[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1]]
  scores = np.array([g] + specialists, np.float32)
  fitness = mj.merge.shared_fitness(scores, alpha=2.0)
  assert int(np.argmin(fitness)) == 0
  population = [{"s": jnp.asarray(row)} for row in scores]
  best, history = mj.merge.evolve(None, population, _identity_scores, generations=0,
                                  key=jax.random.key(0), archive_size=3, alpha=2.0)
  np.testing.assert_array_equal(best["s"], g)
  np.testing.assert_allclose(np.sort(history.archive_scores), [1 / 3, 1 / 3, 1 / 2], rtol=1e-6)
  assert history.best_score.shape == (1,) and history.parents.shape == (0, 2)


def test_evolve_bad_inputs_fail_before_running_a_model(problem):
  population, x, y = problem
  calls = []

  def apply_fn(variables, inputs):
    calls.append(1)
    return _linear_apply(variables, inputs)

  key = jax.random.key(0)
  cases = [
      (dict(population=population[:1]), "at least 2 models"),
      (dict(population=[population[0], {"b": jnp.zeros(2), "w": population[1]["w"]}]), "b"),
      (dict(generations=-1), "generations"),
      (dict(archive_size=1), "archive_size"),
      (dict(archive_size=5), "archive_size"),
      (dict(alpha=-1.0), "alpha"),
      (dict(mate="nearest"), "mate"),
      (dict(data=(x, y.astype(np.float32))), "y must be int"),
      (dict(data=(x[:10], y)), "examples"),
      (dict(data=x), "data"),
  ]
  for change, match in cases:
    args = dict(population=population, data=(x, y), generations=2, archive_size=None,
                alpha=1.0, mate="attraction") | change
    with pytest.raises(ValueError, match=match):
      mj.merge.evolve(apply_fn, args["population"], args["data"],
                      generations=args["generations"], key=key,
                      archive_size=args["archive_size"], alpha=args["alpha"],
                      mate=args["mate"])
  assert not calls
  with pytest.raises(ValueError, match="scores"):
    mj.merge.shared_fitness(np.ones(3))
