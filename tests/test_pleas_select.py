"""Tests for mergejax.merge.pleas_select and pleas(matching="identity")."""

import jax
import numpy as np
import pytest

import mergejax as mj


def _mlp(v, x):
  h = jax.nn.relu(x @ v["l1"]["kernel"] + v["l1"]["bias"])
  h = jax.nn.relu(h @ v["l2"]["kernel"] + v["l2"]["bias"])
  return h @ v["head"]["kernel"] + v["head"]["bias"]


def _init(key, sizes=(5, 10, 8, 3)):
  keys = iter(jax.random.split(key, 6))
  dense = lambda i, o: {"kernel": jax.random.normal(next(keys), (i, o)) / np.sqrt(i),
                        "bias": 0.1 * jax.random.normal(next(keys), (o,))}
  return {name: dense(i, o) for name, i, o in zip(("l1", "l2", "head"), sizes, sizes[1:])}


@pytest.fixture(scope="module")
def pair():
  """(va, vb: va's hidden units permuted, fit batches, held-out x, spec)."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (60, 5)))
  va = _init(jax.random.key(1))
  spec = mj.permutation_spec(_mlp, va, x[:1])
  rng = np.random.default_rng(0)
  perm = {g: rng.permutation(n).astype(np.int32) for g, n in spec.sizes.items()}
  vb = mj.apply_permutation(spec, perm, va)
  return va, vb, [x[:20], x[20:40]], x[40:], spec


def _distance_to(va, held):
  """(merged, layout) -> mean squared difference of the merged model's outputs from va's on `held`."""
  target = np.asarray(_mlp(va, held))
  return lambda merged, layout: float(np.mean((np.asarray(_mlp(merged, held)) - target) ** 2))


def test_identity_matching_without_least_squares_is_the_plain_average():
  va, vb = _init(jax.random.key(1)), _init(jax.random.key(2))
  x = np.asarray(jax.random.normal(jax.random.key(0), (16, 5)))
  merged, layout = mj.merge.pleas(_mlp, va, vb, [x], budget=1.0, matching="identity", least_squares_fit=False,
                                  progress=False)
  average = mj.tree.lerp(va, vb, 0.5)
  for path, leaf in mj.tree.leaves_by_path(average).items():
    np.testing.assert_allclose(mj.tree.leaves_by_path(merged)[path], leaf, rtol=1e-6, atol=1e-6)


def test_a_permuted_copy_selects_the_matching_and_not_the_identity(pair):
  va, vb, batches, held, spec = pair
  score = _distance_to(va, held)
  choice = mj.merge.select_matching(_mlp, va, vb, batches, score, budget=1.0, spec=spec, least_squares_fit=False,
                                    candidates=("identity", "weight"), progress=False)
  assert set(choice.scores) == {"weight", "identity"}
  assert choice.matching == "weight"
  # Matched, the copy averages back into va (DESIGN.md); unmatched, the average of scrambled units is not va.
  assert choice.scores["weight"] < 1e-9 < 1e-3 < choice.scores["identity"]
  assert score(choice.merged, choice.layout) == pytest.approx(choice.scores[choice.matching], abs=1e-9)
  assert choice.report.allocation.cost <= 1.0 + 1e-9


def _scores(values):
  """A held-out score that returns `values` in call order (one per candidate)."""
  values = iter(values)
  return lambda merged, layout: next(values)


def test_the_lowest_finite_score_wins_and_a_tie_goes_to_the_first_listed(pair):
  va, vb, batches, _, spec = pair
  select = lambda values: mj.merge.select_matching(
      _mlp, va, vb, batches, _scores(values), budget=1.0, spec=spec, candidates=("identity", "weight"),
      least_squares_fit=False, progress=False).matching
  assert select([2.0, 1.0]) == "weight"
  assert select([1.0, 1.0]) == "identity"
  assert select([float("nan"), 3.0]) == "weight"
  assert select([1.0, float("-inf")]) == "identity"
  with pytest.raises(ValueError, match="no candidate scored a finite"):
    select([float("nan"), float("inf")])


def test_refit_batches_give_the_chosen_matchings_merge_on_them(pair):
  va, vb, batches, held, spec = pair
  refit = [np.concatenate(batches + [held])]
  choice = mj.merge.select_matching(_mlp, va, vb, batches, _scores([0.0]), budget=1.2, spec=spec,
                                    candidates=("weight",), refit_batches=refit, progress=False)
  expected, layout = mj.merge.pleas(_mlp, va, vb, refit, budget=1.2, spec=spec, matching="weight", progress=False)
  assert choice.matching == "weight" and choice.layout == layout
  for path, leaf in mj.tree.leaves_by_path(expected).items():
    np.testing.assert_allclose(mj.tree.leaves_by_path(choice.merged)[path], leaf, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"candidates": ()}, "no candidates"),
    ({"candidates": ("weight", "zip")}, "unknown candidates"),
    ({"candidates": ("weight", "weight")}, "listed twice"),
    ({"matching": "weight"}, "as `candidates`"),
])
def test_bad_candidates_are_refused_before_any_merge(pair, kwargs, match):
  va, vb, _, _, spec = pair

  def never_read():
    raise AssertionError("the batches were read")

  with pytest.raises(ValueError, match=match):
    mj.merge.select_matching(_mlp, va, vb, never_read, _scores([]), budget=1.0, spec=spec, **kwargs)
  with pytest.raises(TypeError, match="heldout_score must be callable"):
    mj.merge.select_matching(_mlp, va, vb, never_read, 0.5, budget=1.0, spec=spec)
  with pytest.raises(ValueError, match="matching must be one of"):
    mj.merge.pleas(_mlp, va, vb, never_read, budget=1.0, spec=spec, matching="none")
