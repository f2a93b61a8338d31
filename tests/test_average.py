"""Tests for mergejax.merge.average: averages and soups against NumPy."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj


@st.composite
def pytrees(draw, num: int, discrete: bool | None = None):
  """`num` random pytrees of one random structure.

  Dicts nested zero to two deep, holding one to four float32 leaves of zero to
  three axes. Entries are standard normal, or (when `discrete`, or at random
  when None) small integers, so that magnitudes tie and sums cancel exactly.
  """
  num_leaves = draw(st.integers(1, 4))
  shapes = [tuple(draw(st.lists(st.integers(1, 4), max_size=3))) for _ in range(num_leaves)]
  depths = [draw(st.integers(0, 2)) for _ in range(num_leaves)]
  if discrete is None:
    discrete = draw(st.booleans())
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def make():
    out = {}
    for i, (shape, depth) in enumerate(zip(shapes, depths)):
      node = out
      for d in range(depth):
        node = node.setdefault(f"block_{d}", {})
      x = rng.integers(-3, 4, shape) if discrete else rng.normal(size=shape)
      node[f"w{i}"] = x.astype(np.float32)
    return out

  return [make() for _ in range(num)]


def assert_trees_close(got, want, rtol=1e-5, atol=1e-5):
  """Same structure, and every leaf of `got` close to `want`'s."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, g, w in zip(
      [mj.tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]],
      jax.tree.leaves(got),
      jax.tree.leaves(want),
  ):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol, err_msg=path)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def average_reference(models, weights):
  """sum_i w_i x_i / sum_i w_i, leaf by leaf, in float64."""
  w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
  leaves = [jax.tree.leaves(m) for m in models]
  merged = [
      sum(wi * np.asarray(ls[j], np.float64) for wi, ls in zip(w, leaves)) / w.sum()
      for j in range(len(leaves[0]))
  ]
  return jax.tree.unflatten(jax.tree.structure(models[0]), merged)


def greedy_soup_reference(models, score, maximize):
  """Wortsman et al.'s Recipe 1 on flattened float64 models."""
  flat = [_flat(m) for m in models]
  sign = 1.0 if maximize else -1.0
  scores = np.array([sign * score(f) for f in flat])
  order = np.argsort(-scores, kind="stable")
  chosen, best = [int(order[0])], scores[order[0]]
  for i in order[1:]:
    candidate = sign * score(np.mean([flat[j] for j in chosen + [i]], axis=0))
    if candidate >= best:
      chosen.append(int(i))
      best = candidate
  return np.mean([flat[j] for j in chosen], axis=0), chosen


@st.composite
def models_and_weights(draw):
  n = draw(st.integers(1, 4))
  models = draw(pytrees(n))
  weights = draw(st.none() | st.lists(st.floats(0, 5), min_size=n, max_size=n))
  if weights is not None:
    weights[draw(st.integers(0, n - 1))] += 0.5  # At least one positive.
  return models, weights


@hypothesis.given(models_and_weights())
def test_average_matches_numpy(case):
  models, weights = case
  assert_trees_close(mj.merge.average(models, weights), average_reference(models, weights))


@hypothesis.given(models_and_weights(), st.randoms())
def test_average_is_invariant_to_model_order(case, random):
  models, weights = case
  order = list(range(len(models)))
  random.shuffle(order)
  shuffled_weights = None if weights is None else [weights[i] for i in order]
  assert_trees_close(
      mj.merge.average([models[i] for i in order], shuffled_weights),
      mj.merge.average(models, weights),
  )


@hypothesis.given(pytrees(1), st.integers(1, 4), st.lists(st.floats(0.1, 5), min_size=4, max_size=4))
def test_copies_of_a_model_merge_to_it(trees, n, weights):
  (model,) = trees
  copies = [model] * n
  assert_trees_close(mj.merge.average(copies, weights[:n]), model, rtol=1e-6, atol=1e-6)
  assert_trees_close(mj.merge.uniform_soup(copies), model, rtol=1e-6, atol=1e-6)
  soup, chosen = mj.merge.greedy_soup(copies, lambda v: 0.0)
  assert_trees_close(soup, model, rtol=1e-6, atol=1e-6)
  assert chosen == list(range(n))


@hypothesis.given(models_and_weights())
def test_uniform_soup_is_the_unweighted_average(case):
  models, _ = case
  assert_trees_close(mj.merge.uniform_soup(models), average_reference(models, None))


def test_average_keeps_leaf_dtypes():
  a = {"w": jnp.ones(3, jnp.bfloat16), "step": jnp.full(2, 4, jnp.int32)}
  b = {"w": jnp.zeros(3, jnp.bfloat16), "step": jnp.full(2, 4, jnp.int32)}
  merged = mj.merge.average([a, b])
  assert merged["w"].dtype == jnp.bfloat16
  assert merged["step"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(merged["w"], np.float32), 0.5)
  np.testing.assert_array_equal(merged["step"], 4)


@st.composite
def soup_case(draw):
  n = draw(st.integers(1, 4))
  trees = draw(pytrees(n + 1, discrete=False))
  return trees[:n], _flat(trees[n]), draw(st.booleans())


@hypothesis.given(soup_case())
def test_greedy_soup_matches_numpy(case):
  models, target, maximize = case
  distance = lambda flat: float(np.sum((flat - target) ** 2))
  score = (lambda flat: -distance(flat)) if maximize else distance
  soup, chosen = mj.merge.greedy_soup(models, lambda v: score(_flat(v)), maximize=maximize)
  want_soup, want_chosen = greedy_soup_reference(models, score, maximize)
  assert chosen == want_chosen
  np.testing.assert_allclose(_flat(soup), want_soup, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("maximize", [True, False])
def test_greedy_soup_picks_the_ingredients_that_help(maximize):
  target = np.linspace(-1, 1, 6).astype(np.float32)
  offset = np.array([1, -1, 2, 0, 1, -2], np.float32)
  models = [
      {"w": target + 10 * offset},  # Far off: the soup gets worse with it.
      {"w": target + offset},  # Together with the next one: exactly the target.
      {"w": target - offset},
      {"w": target + 3 * offset},
  ]
  distance = lambda v: float(np.sum((np.asarray(v["w"]) - target) ** 2))
  eval_fn = (lambda v: -distance(v)) if maximize else distance
  soup, chosen = mj.merge.greedy_soup(models, eval_fn, maximize=maximize)
  # Ingredients 1 and 2 tie as the best (input order breaks it); 3 would move
  # the soup off the target, 0 even more.
  assert chosen == [1, 2]
  np.testing.assert_allclose(soup["w"], target, atol=1e-6)


def test_greedy_soup_calls_eval_once_per_ingredient_and_candidate():
  models = [{"w": np.full(2, float(i), np.float32)} for i in range(4)]
  calls = []

  def eval_fn(v):
    calls.append(np.asarray(v["w"]).copy())
    return -float(np.sum(v["w"]))

  mj.merge.greedy_soup(models, eval_fn)
  assert len(calls) == 2 * len(models) - 1


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0], r"2 models but weights of shape \(1,\)"),
        ([1.0, -0.5], "non-negative"),
        ([0.0, 0.0], "all zero"),
        ([1.0, float("nan")], "finite"),
    ],
)
def test_average_rejects_bad_weights(weights, match):
  models = [{"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}]
  with pytest.raises(ValueError, match=match):
    mj.merge.average(models, weights)


def test_errors_name_the_path_and_come_first():
  a = {"params": {"dense": {"kernel": np.zeros((2, 3), np.float32)}}}
  wider = {"params": {"dense": {"kernel": np.zeros((2, 4), np.float32)}}}
  other = {"params": {"dense": {"bias": np.zeros(3, np.float32)}}}
  for fn in (mj.merge.average, mj.merge.uniform_soup):
    with pytest.raises(ValueError, match="need at least one model"):
      fn([])
    with pytest.raises(ValueError, match=r"params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
      fn([a, wider])
    with pytest.raises(ValueError, match="params/dense/kernel: in tree 0, not in tree 1"):
      fn([a, other])
  never = lambda v: pytest.fail("eval_fn called before validation")
  with pytest.raises(ValueError, match="need at least one model"):
    mj.merge.greedy_soup([], never)
  with pytest.raises(ValueError, match="params/dense/kernel"):
    mj.merge.greedy_soup([a, wider], never)


def test_greedy_soup_rejects_a_non_finite_score():
  models = [{"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}]
  with pytest.raises(ValueError, match=r"eval_fn\(models\[0\]\) returned nan"):
    mj.merge.greedy_soup(models, lambda v: float("nan"))
  with pytest.raises(ValueError, match=r"eval_fn\(soup \+ models\[1\]\) returned inf"):
    mj.merge.greedy_soup(models, lambda v: float("inf") if np.all(v["w"] == 0.5) else 0.0)
