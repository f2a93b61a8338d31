"""Tests for mergejax.merge.task_vectors: task arithmetic, TIES and DARE
against plain NumPy references, their identities, and their errors."""

import math
import zlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_average import pytrees


def _leaves(tree):
  """[(path 'a/b/c', float32 leaf)] in flattening order, paths built here."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [("/".join(str(k.key) for k in p), np.asarray(x, np.float32)) for p, x in flat]


def _unflatten(like, leaves):
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def reference_task_vectors(base, models, drop=0.0, key=None):
  """[[f32 leaf of tau_i] per leaf] per model; DARE-dropped with a key."""
  out = []
  for i, model in enumerate(models):
    taus = []
    for (path, b), (_, x) in zip(_leaves(base), _leaves(model)):
      tau = x - b  # float32, as the library computes it.
      if key is not None:
        leaf_key = jax.random.fold_in(jax.random.fold_in(key, i), zlib.crc32(path.encode()))
        kept = np.asarray(jax.random.bernoulli(leaf_key, 1.0 - drop, tau.shape))
        tau = np.where(kept, tau / np.float32(1.0 - drop), np.float32(0))
      taus.append(tau)
    out.append(taus)
  return out


def reference_task_arithmetic(base, models, scales, drop=0.0, key=None):
  taus = reference_task_vectors(base, models, drop, key)
  merged = [
      b.astype(np.float64) + sum(s * t[j].astype(np.float64) for s, t in zip(scales, taus))
      for j, (_, b) in enumerate(_leaves(base))
  ]
  return _unflatten(base, merged)


def reference_k(density, size):
  """ceil(density * size) up to float error, at least 1 (TIES's top-k)."""
  return max(1, int(np.ceil(np.float64(density) * size - 1e-6)))


def reference_kth_largest(values, k):
  return np.sort(np.abs(np.ravel(values)))[::-1][k - 1]


def reference_thresholds(base, models, density, drop=0.0, key=None):
  """Each model's k-th largest |tau_i| over all its leaves."""
  out = []
  for taus in reference_task_vectors(base, models, drop, key):
    flat = np.concatenate([np.ravel(t) for t in taus])
    out.append(reference_kth_largest(flat, reference_k(density, flat.size)))
  return out


def reference_ties(base, models, density, scale, trim, thresholds=None, drop=0.0, key=None):
  """Trim, elect, disjoint mean, leaf by leaf, in float64."""
  taus = reference_task_vectors(base, models, drop, key)
  if trim == "global" and thresholds is None:
    thresholds = reference_thresholds(base, models, density, drop, key)
  merged = []
  for j, (_, b) in enumerate(_leaves(base)):
    trimmed = []
    for i in range(len(models)):
      tau = taus[i][j].astype(np.float64)
      if trim == "tensor":
        at = reference_kth_largest(tau, reference_k(density, tau.size))
      else:
        at = np.float32(thresholds[i])
      trimmed.append(np.where(np.abs(tau) >= at, tau, 0.0))
    trimmed = np.stack(trimmed)
    elected = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(axis=0)
    mean = np.where(agree, trimmed, 0).sum(axis=0) / np.maximum(count, 1)
    merged.append(b + scale * np.where(count > 0, mean, 0.0))
  return _unflatten(base, merged)


@st.composite
def base_and_models(draw, discrete=None):
  n = draw(st.integers(1, 4))
  trees = draw(pytrees(n + 1, discrete))
  return trees[0], trees[1:]


@st.composite
def one_structure_base_and_models(draw):
  """As `base_and_models`, every example in one structure: a scalar and a nested matrix.

  The merges compile once per leaf shape and number of models, so the properties below
  that run every merge compile for the first example of each number of models and then
  run compiled; the NumPy comparisons above draw the structures.
  """
  n = draw(st.integers(1, 4))
  discrete = draw(st.booleans())  # small integers: magnitudes tie and sums cancel exactly
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def make():
    draw_leaf = lambda shape: (rng.integers(-3, 4, shape) if discrete else rng.normal(size=shape)).astype(np.float32)
    return {"w0": draw_leaf(()), "block_0": {"block_1": {"w1": draw_leaf((2, 3))}}}

  return make(), [make() for _ in range(n)]


densities = st.floats(0.01, 1.0)
drops = st.floats(0.0, 0.9)
scales = st.floats(-2.0, 2.0)
keys = st.integers(0, 2**31 - 1).map(jax.random.key)


@hypothesis.given(base_and_models(), scales, st.lists(scales, min_size=4, max_size=4), st.booleans())
def test_task_arithmetic_matches_numpy(case, scale, per_model, one_scale):
  base, models = case
  s = scale if one_scale else per_model[: len(models)]
  want = reference_task_arithmetic(base, models, [scale] * len(models) if one_scale else s)
  assert_trees_close(mj.merge.task_arithmetic(base, models, scale=s), want)


@hypothesis.given(base_and_models())
def test_task_vector_is_the_difference(case):
  base, (tuned, *_) = case
  want = _unflatten(base, [x - b for (_, b), (_, x) in zip(_leaves(base), _leaves(tuned))])
  assert_trees_close(mj.merge.task_vector(base, tuned), want, rtol=0, atol=0)


@hypothesis.given(base_and_models(), densities, scales, st.sampled_from(mj.merge.task_vectors.TRIMS))
def test_ties_matches_numpy(case, density, scale, trim):
  base, models = case
  assert_trees_close(
      mj.merge.ties(base, models, density=density, scale=scale, trim=trim),
      reference_ties(base, models, density, scale, trim),
  )


@hypothesis.given(base_and_models(), densities, st.lists(st.floats(0, 3), min_size=4, max_size=4))
def test_ties_thresholds_and_given_thresholds_match_numpy(case, density, given):
  base, models = case
  thresholds = mj.merge.ties_thresholds(base, models, density)
  np.testing.assert_array_equal(thresholds, reference_thresholds(base, models, density))
  # The thresholds of a first pass give back the global trim exactly.
  assert_trees_close(
      mj.merge.ties(base, models, density=density, trim="global", thresholds=thresholds),
      mj.merge.ties(base, models, density=density, trim="global"),
      rtol=0, atol=0,
  )
  given = given[: len(models)]
  assert_trees_close(
      mj.merge.ties(base, models, trim="global", thresholds=given),
      reference_ties(base, models, None, 1.0, "global", thresholds=given),
  )


@hypothesis.settings(max_examples=10)  # each example compiles every merge anew
@hypothesis.given(base_and_models(), drops, scales, keys)
def test_dare_matches_numpy(case, drop, scale, key):
  base, models = case
  want = reference_task_arithmetic(base, models, [scale] * len(models), drop, key)
  assert_trees_close(mj.merge.dare(base, models, drop=drop, key=key, scale=scale), want)


@hypothesis.settings(max_examples=10)  # each example compiles every merge anew
@hypothesis.given(
    base_and_models(), drops, densities, scales, keys, st.sampled_from(mj.merge.task_vectors.TRIMS)
)
def test_dare_ties_matches_numpy(case, drop, density, scale, key, trim):
  base, models = case
  got = mj.merge.dare_ties(
      base, models, drop=drop, density=density, key=key, scale=scale, trim=trim
  )
  want = reference_ties(base, models, density, scale, trim, drop=drop, key=key)
  assert_trees_close(got, want)
  if trim == "global":
    np.testing.assert_array_equal(
        mj.merge.ties_thresholds(base, models, density, drop=drop, key=key),
        reference_thresholds(base, models, density, drop, key),
    )


@hypothesis.settings(max_examples=10)
@hypothesis.given(one_structure_base_and_models(), keys)
def test_zero_scale_and_zero_drop_identities(case, key):
  base, models = case
  assert_trees_close(mj.merge.task_arithmetic(base, models, scale=0.0), base, rtol=0, atol=0)
  assert_trees_close(mj.merge.ties(base, models, scale=0.0), base, rtol=0, atol=0)
  assert_trees_close(
      mj.merge.dare(base, models, drop=0.0, key=key, scale=0.7),
      mj.merge.task_arithmetic(base, models, scale=0.7),
      rtol=0, atol=0,
  )
  for trim in mj.merge.task_vectors.TRIMS:
    assert_trees_close(
        mj.merge.dare_ties(base, models, drop=0.0, density=0.5, key=key, trim=trim),
        mj.merge.ties(base, models, density=0.5, trim=trim),
        rtol=0, atol=0,
    )


@hypothesis.settings(max_examples=10)
@hypothesis.given(one_structure_base_and_models(), st.integers(1, 4), keys)
def test_copies_of_one_model_merge_to_it(case, n, key):
  base, (model, *_) = case
  copies = [model] * n
  assert_trees_close(mj.merge.task_arithmetic(base, copies, scale=1 / n), model)
  assert_trees_close(mj.merge.dare(base, copies, drop=0.0, key=key, scale=1 / n), model)
  for trim in mj.merge.task_vectors.TRIMS:
    assert_trees_close(mj.merge.ties(base, copies, density=1.0, trim=trim), model)
    assert_trees_close(
        mj.merge.dare_ties(base, copies, drop=0.0, density=1.0, key=key, trim=trim), model
    )


@hypothesis.given(base_and_models(discrete=True), st.sampled_from(mj.merge.task_vectors.TRIMS))
def test_opposite_task_vectors_cancel(case, trim):
  base, (model, *_) = case
  opposite = jax.tree.map(lambda b, x: 2 * b - x, base, model)
  # The task vectors are tau and -tau: no sign wins anywhere, every entry is 0.
  assert_trees_close(
      mj.merge.ties(base, [model, opposite], density=1.0, trim=trim), base, rtol=0, atol=0
  )
  assert_trees_close(mj.merge.task_arithmetic(base, [model, opposite]), base, atol=1e-5)


@hypothesis.given(base_and_models(), st.integers(0, 3), keys)
def test_merges_are_invariant_to_model_order(case, shift, key):
  base, models = case
  shift %= len(models)
  rotated = models[shift:] + models[:shift]
  assert_trees_close(
      mj.merge.ties(base, rotated, density=0.5), mj.merge.ties(base, models, density=0.5)
  )
  assert_trees_close(
      mj.merge.task_arithmetic(base, rotated, scale=0.5),
      mj.merge.task_arithmetic(base, models, scale=0.5),
  )


def _nested(path, leaf):
  """`leaf` in dicts nested along `path` ('a/b/c')."""
  for k in reversed(path.split("/")):
    leaf = {k: leaf}
  return leaf


def assert_merges_leaf_by_leaf(merge, base, models, name="", leaf_kwargs=lambda path: {}):
  """Merging each leaf alone, nested along its path, equals the whole merge.

  `merge(base, models, **kw)`; `leaf_kwargs(path)` gives the kw of the one-leaf merges.
  """
  whole = _leaves(merge(base, models))
  model_leaves = [_leaves(m) for m in models]
  for j, (path, b) in enumerate(_leaves(base)):
    one = merge(_nested(path, b), [_nested(path, ls[j][1]) for ls in model_leaves], **leaf_kwargs(path))
    np.testing.assert_array_equal(
        _leaves(one)[0][1], whole[j][1], err_msg=f"{name} {path}" if name else path)


@hypothesis.settings(max_examples=10)
@hypothesis.given(one_structure_base_and_models(), drops, densities, keys)
def test_one_leaf_at_a_time_reproduces_the_whole_merge(case, drop, density, key):
  base, models = case
  thresholds = mj.merge.ties_thresholds(base, models, density, drop=drop, key=key)
  merges = {
      "dare": lambda b, ms: mj.merge.dare(b, ms, drop=drop, key=key, scale=0.5),
      "dare_ties": lambda b, ms: mj.merge.dare_ties(b, ms, drop=drop, density=density, key=key),
      "dare_ties_global": lambda b, ms: mj.merge.dare_ties(
          b, ms, drop=drop, density=density, key=key, trim="global", thresholds=thresholds
      ),
  }
  for name, merge in merges.items():
    assert_merges_leaf_by_leaf(merge, base, models, name)


def test_global_trim_spends_the_budget_where_the_big_changes_are():
  base = {"big": np.zeros(4, np.float32), "small": np.zeros(4, np.float32)}
  model = {"big": np.array([5, -6, 7, -8], np.float32),
           "small": np.array([0.1, -0.2, 0.3, -0.4], np.float32)}
  tensor = mj.merge.ties(base, [model], density=0.5, trim="tensor")
  global_ = mj.merge.ties(base, [model], density=0.5, trim="global")
  # Per tensor, each leaf keeps its own 2 largest; globally the 4 largest of
  # the model's 8 entries are all in "big", and "small" stays at the base.
  np.testing.assert_array_equal(tensor["big"], [0, 0, 7, -8])
  np.testing.assert_allclose(tensor["small"], [0, 0, 0.3, -0.4])
  np.testing.assert_array_equal(global_["big"], model["big"])
  np.testing.assert_array_equal(global_["small"], base["small"])
  assert mj.merge.ties_thresholds(base, [model], 0.5) == [5.0]


def test_ties_keeps_every_entry_tied_with_the_kth():
  base = {"w": np.zeros(5, np.float32)}
  model = {"w": np.array([3, -3, 3, 1, -2], np.float32)}
  merged = mj.merge.ties(base, [model], density=0.2)  # k = 1, three tie at 3.
  np.testing.assert_array_equal(merged["w"], [3, -3, 3, 0, 0])


def test_ties_elects_the_sign_of_the_summed_mass():
  base = {"w": np.zeros(3, np.float32)}
  models = [{"w": np.array([1, 4, 2], np.float32)},
            {"w": np.array([2, -1, -2], np.float32)},
            {"w": np.array([-5, -1, 0], np.float32)}]
  merged = mj.merge.ties(base, models, density=1.0)
  # Entry 0: sum -2, only model 2 agrees. Entry 1: sum 2, only model 0.
  # Entry 2: sum 0, nobody agrees.
  np.testing.assert_array_equal(merged["w"], [-5, 4, 0])


def test_dare_drops_the_given_fraction_and_is_unbiased():
  size, drop = 200_000, 0.3
  base = {"w": np.zeros(size, np.float32)}
  model = {"w": np.ones(size, np.float32)}
  out = np.asarray(mj.merge.dare(base, [model], drop=drop, key=jax.random.key(0))["w"])
  kept = out != 0
  assert abs(1 - kept.mean() - drop) < 4 * math.sqrt(drop * (1 - drop) / size)
  np.testing.assert_allclose(out[kept], 1 / (1 - drop), rtol=1e-6)
  assert abs(out.mean() - 1) < 4 * math.sqrt(drop / (1 - drop) / size)


def test_dare_is_determined_by_its_key():
  base = {"a": {"w": np.zeros(64, np.float32)}, "b": np.zeros(64, np.float32)}
  models = [{"a": {"w": np.ones(64, np.float32)}, "b": np.ones(64, np.float32)}] * 2
  merge = lambda key: _leaves(mj.merge.dare(base, models, drop=0.5, key=key))
  same, again, other = merge(jax.random.key(1)), merge(jax.random.key(1)), merge(jax.random.key(2))
  for (_, x), (_, y), (_, z) in zip(same, again, other):
    np.testing.assert_array_equal(x, y)
    assert np.any(x != z)
  # The two leaves draw different masks, and so do the two (equal) models:
  # an entry is 2 where exactly one of them keeps it.
  (_, a), (_, b) = same
  assert np.any(a != b)
  assert np.any(a == 2)


def test_leaf_key_is_the_documented_derivation():
  key = jax.random.key(3)
  want = jax.random.fold_in(jax.random.fold_in(key, 2), zlib.crc32(b"params/dense/kernel"))
  (jax_path, _), = jax.tree_util.tree_flatten_with_path({"params": {"dense": {"kernel": 0}}})[0]
  for path in (jax_path, ("params", "dense", "kernel")):
    np.testing.assert_array_equal(
        jax.random.key_data(mj.merge.leaf_key(key, 2, path)), jax.random.key_data(want)
    )


@pytest.mark.parametrize(
    "density, size, k",
    [(0.7, 10, 7), (0.2, 10, 2), (0.21, 10, 3), (1.0, 7, 7), (1e-9, 10, 1), (0.5, 0, 0), (0.3, 1, 1)],
)
def test_keep_count(density, size, k):
  assert mj.merge.keep_count(density, size) == k


def test_merges_keep_the_base_dtypes():
  base = {"w": jnp.zeros(8, jnp.bfloat16)}
  models = [{"w": jnp.ones(8, jnp.bfloat16)}, {"w": jnp.full(8, 2, jnp.bfloat16)}]
  key = jax.random.key(0)
  for merged in (
      mj.merge.task_arithmetic(base, models),
      mj.merge.ties(base, models),
      mj.merge.dare(base, models, drop=0.5, key=key),
      mj.merge.dare_ties(base, models, drop=0.5, density=0.5, key=key),
  ):
    assert merged["w"].dtype == jnp.bfloat16


# Bad-input trees shared by the merges' argument-checking tests.
BAD_INPUT_BASE = {"params": {"dense": {"kernel": np.zeros((2, 3), np.float32)}}}
BAD_INPUT_MODEL = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}}
BAD_INPUT_WIDER = {"params": {"dense": {"kernel": np.ones((2, 4), np.float32)}}}
_OTHER = {"params": {"dense": {"bias": np.ones(3, np.float32)}}}
_KEY = jax.random.key(0)
_MERGES = {
    "task_arithmetic": lambda models, **kw: mj.merge.task_arithmetic(BAD_INPUT_BASE, models, **kw),
    "ties": lambda models, **kw: mj.merge.ties(BAD_INPUT_BASE, models, **kw),
    "ties_thresholds": lambda models, **kw: mj.merge.ties_thresholds(
        BAD_INPUT_BASE, models, kw.pop("density", 0.5), **kw),
    "dare": lambda models, **kw: mj.merge.dare(BAD_INPUT_BASE, models, **{"drop": 0.5, "key": _KEY, **kw}),
    "dare_ties": lambda models, **kw: mj.merge.dare_ties(
        BAD_INPUT_BASE, models, **{"drop": 0.5, "density": 0.5, "key": _KEY, **kw}),
}


@pytest.mark.parametrize("name", sorted(_MERGES))
def test_mismatched_or_missing_models_are_named(name):
  merge = _MERGES[name]
  with pytest.raises(ValueError, match="need at least one model"):
    merge([])
  with pytest.raises(ValueError, match=r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
    merge([BAD_INPUT_MODEL, BAD_INPUT_WIDER])
  with pytest.raises(ValueError, match=r"models\[0\] does not match the base: params/dense/kernel: in tree 0, not in tree 1"):
    merge([_OTHER])
  with pytest.raises(ValueError, match="does not match the base"):
    mj.merge.task_vector(BAD_INPUT_BASE, BAD_INPUT_WIDER)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("task_arithmetic", {"scale": [1.0, 2.0, 3.0]}, "2 models but 3 scales"),
        ("task_arithmetic", {"scale": float("nan")}, "scale must be finite"),
        ("dare", {"scale": [1.0]}, "2 models but 1 scales"),
        ("dare", {"drop": 1.0}, r"drop must be in \[0, 1\)"),
        ("dare", {"drop": -0.1}, r"drop must be in \[0, 1\)"),
        ("dare", {"key": None}, "needs a random key"),
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("ties", {"density": float("nan")}, r"density must be in \(0, 1\]"),
        ("ties", {"scale": float("inf")}, "scale must be finite"),
        ("ties", {"trim": "layer"}, "trim must be one of"),
        ("ties", {"thresholds": [0.1, 0.2]}, "pass trim='global'"),
        ("ties", {"trim": "global", "thresholds": [0.1]}, r"2 models but thresholds of shape \(1,\)"),
        ("ties", {"trim": "global", "thresholds": [0.1, -1.0]}, "finite and >= 0"),
        ("ties_thresholds", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("ties_thresholds", {"drop": 0.5}, "needs a random key"),
        ("ties_thresholds", {"drop": 1.0, "key": _KEY}, r"drop must be in \[0, 1\)"),
        ("dare_ties", {"drop": 1.0}, r"drop must be in \[0, 1\)"),
        ("dare_ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("dare_ties", {"key": None}, "needs a random key"),
        ("dare_ties", {"trim": "global", "thresholds": [0.1, float("nan")]}, "finite and >= 0"),
    ],
)
def test_bad_arguments_are_rejected(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _MERGES[name]([BAD_INPUT_MODEL, BAD_INPUT_MODEL], **kwargs)


# Other tools' conventions: NumPy transcriptions of FusionBench's and
# mergekit's algorithms (read from tanganke/fusion_bench
# method/ties_merging/ties_merging_utils.py and method/dare/, and from
# arcee-ai/mergekit sparsify.py and merge_methods/generalized_task_arithmetic.py),
# with the tools' torch random masks replaced by mergejax's `leaf_key` masks.


@st.composite
def fixed_base_and_models(draw, discrete):
  """A base and 3 models of one fixed structure (so that examples share their
  compilations), entries small integers (`discrete`) or standard normal."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  draw_leaf = lambda shape: (rng.integers(-3, 4, shape) if discrete else rng.normal(size=shape)).astype(np.float32)
  return [{"a": {"w": draw_leaf((4, 5))}, "b": draw_leaf((5,)), "c": draw_leaf(())} for _ in range(4)]


def fusion_bench_ties(base, models, density, scale, merge_func):
  """FusionBench's `ties_merging` of the whole flattened model. (Its DARE,
  `param_random_drop_`, divides survivors by 1 - drop, as mergejax's.)"""
  flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves])
  v = np.stack([flat(t) for t in reference_task_vectors(base, models)])
  d = v.shape[1]
  k = d - int(d * density)  # topk_values_mask: the k-th smallest |v| is the threshold.
  kth = np.sort(np.abs(v), axis=1)[:, k - 1 : k]
  v = v * (np.abs(v) >= kth)
  sign = np.sign(v.sum(axis=0))  # resolve_sign
  sign[sign == 0] = np.sign(sign.sum())
  selected = v * np.where(sign > 0, v > 0, v < 0)  # disjoint_merge
  if merge_func == "mean":
    merged = selected.sum(axis=0) / np.maximum((selected != 0).sum(axis=0), 1)
  else:
    merged = selected.sum(axis=0)
  flat_base = flat([b for _, b in _leaves(base)]).astype(np.float64)
  out = flat_base + scale * merged
  sizes = np.cumsum([b.size for _, b in _leaves(base)])[:-1]
  return _unflatten(base, [x.reshape(b.shape) for x, (_, b) in zip(np.split(out, sizes), _leaves(base))])


def mergekit_l1_rescale(tau, kept):
  """mergekit's `rescaled_masked_tensor(tau, kept, RescaleNorm.l1)`."""
  masked = tau * kept
  before, after = np.abs(tau).sum(), np.abs(masked).sum()
  if before < 1e-7 or after < 1e-7:
    return masked
  return masked * (before / after)


def mergekit_task_vectors(base, models, drop, key):
  """[[leaf of tau_i]]: mergekit's `bernoulli` sparsification (density = 1 -
  drop) with the L1 rescale, the mask drawn as mergejax draws DARE's."""
  out = []
  for i, model in enumerate(models):
    taus = []
    for (path, b), (_, x) in zip(_leaves(base), _leaves(model)):
      tau = x - b
      if key is not None:
        leaf_key = jax.random.fold_in(jax.random.fold_in(key, i), zlib.crc32(path.encode()))
        kept = np.asarray(jax.random.bernoulli(leaf_key, 1.0 - drop, tau.shape))
        tau = mergekit_l1_rescale(tau, kept)
      taus.append(tau)
    out.append(taus)
  return out


def mergekit_magnitude(tau, density):
  """mergekit's `sparsify.magnitude`: the int(density * n) largest |tau|
  (mergekit asserts that is > 0; mergejax keeps 1 there)."""
  if density >= 1:
    return tau
  k = max(1, int(density * tau.size))
  mask = np.zeros(tau.size)
  mask[np.argsort(-np.abs(tau).ravel(), kind="stable")[:k]] = 1
  return tau * mask.reshape(tau.shape)


def mergekit_gta(base, models, weights, lam, density=None, consensus=True, normalize=True, drop=0.0, key=None):
  """mergekit's `GTATask.execute` leaf by leaf: sparsify, weigh, elect by the
  weighted sum (+1 where it is >= 0), mix, normalise by the agreeing weights."""
  taus = mergekit_task_vectors(base, models, drop, key)
  merged = []
  for j, (_, b) in enumerate(_leaves(base)):
    deltas = np.stack([t[j] if density is None else mergekit_magnitude(t[j], density) for t in taus])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * b.ndim)
    weighted = deltas * w
    if consensus:
      majority = np.where(weighted.sum(axis=0) >= 0, 1, -1)
      mask = np.sign(weighted) == majority
      mixed, divisor = (weighted * mask).sum(axis=0), (w * mask).sum(axis=0)
      divisor = np.where(divisor == 0, 1, divisor)
    else:
      mixed, divisor = weighted.sum(axis=0), w.sum(axis=0)
    merged.append(b + lam * (mixed / divisor if normalize else mixed))
  return _unflatten(base, merged)


@hypothesis.settings(max_examples=8)  # each example compiles every merge anew
@hypothesis.given(
    fixed_base_and_models(discrete=True),
    st.one_of(st.floats(0.01, 0.99), st.integers(1, 25).map(lambda k: k / 26)),  # 26 entries
    scales, st.sampled_from(["mean", "sum"]),
)
def test_fusion_bench_convention_matches_its_ties_merging(trees, density, scale, merge_func):
  base, *models = trees
  got = mj.merge.ties(
      base, models, density=density, scale=scale, trim="global", convention="fusion_bench",
      aggregate=merge_func,
  )
  assert_trees_close(got, fusion_bench_ties(base, models, density, scale, merge_func))


@hypothesis.settings(max_examples=8)  # each example compiles every merge anew
@hypothesis.given(
    fixed_base_and_models(discrete=False), st.floats(0.05, 1.0), st.floats(0.1, 2.0), scales,
    st.booleans(),
)
def test_mergekit_convention_matches_its_ties(trees, density, weight, lam, normalize):
  base, *models = trees  # Normal entries: no two magnitudes tie, where mergekit keeps exactly k.
  got = mj.merge.ties(
      base, models, density=density, convention="mergekit",
      scale=lam if normalize else lam * weight, aggregate="mean" if normalize else "sum",
  )
  want = mergekit_gta(base, models, [weight] * len(models), lam, density, normalize=normalize)
  assert_trees_close(got, want)


@hypothesis.settings(max_examples=8)  # each example compiles every merge anew
@hypothesis.given(
    fixed_base_and_models(discrete=True), st.floats(0.05, 1.0), st.floats(0.1, 2.0), scales, keys
)
def test_mergekit_convention_matches_its_dare_ties_and_dare_linear(trees, density, weight, lam, key):
  base, *models = trees
  # mergekit's dare_ties does no magnitude trim: density 1 (a global trim
  # keeping every entry, as the out-of-core test's, which shares compilations).
  got = mj.merge.dare_ties(
      base, models, drop=1 - density, density=1.0, key=key, scale=lam * weight,
      trim="global", convention="mergekit", aggregate="sum",
  )
  want = mergekit_gta(base, models, [weight] * len(models), lam, normalize=False, drop=1 - density, key=key)
  assert_trees_close(got, want)
  weights = [weight * (i + 1) for i in range(len(models))]
  got = mj.merge.dare(
      base, models, drop=1 - density, key=key, scale=[lam * w for w in weights], convention="mergekit"
  )
  want = mergekit_gta(base, models, weights, lam, consensus=False, normalize=False, drop=1 - density, key=key)
  assert_trees_close(got, want)


# Two task vectors with three large entries each. At density 0.2 (d n = 2,
# an integer) mergejax and mergekit keep 2 entries, FusionBench 3; at 0.25
# (d n = 2.5) mergejax and FusionBench keep 3, mergekit 2.
_KEEP_BASE = {"w": np.zeros(10, np.float32)}
_KEEP_MODELS = [
    {"w": np.array([9, 8, 7, 0, 6, 0, 0, 0, 0, 0], np.float32)},
    {"w": np.array([0, 0, 0, -9, -6, 0, -0.5, 0, 0, 0], np.float32)},
]
_TWO = [9, 8, 0, -9, -6, 0, 0, 0, 0, 0]
_THREE = [9, 8, 7, -9, -6, 0, -0.5, 0, 0, 0]


@pytest.mark.parametrize(
    "convention, density, want",
    [
        ("mergejax", 0.2, _TWO), ("fusion_bench", 0.2, _THREE), ("mergekit", 0.2, _TWO),
        ("mergejax", 0.25, _THREE), ("fusion_bench", 0.25, _THREE), ("mergekit", 0.25, _TWO),
    ],
)
def test_each_convention_keeps_its_own_count(convention, density, want):
  merged = mj.merge.ties(_KEEP_BASE, _KEEP_MODELS, density=density, convention=convention)
  np.testing.assert_array_equal(merged["w"], want)


# Four non-zero entries each, all kept at density 0.4 by every keep rule.
# Entries 0, 1 are elected +, 2, 3, 5 are elected -, and entry 4 sums to 0.
_BALANCE_MODELS = [
    {"w": np.array([9, 8, 7, 0, 6, 0, 0, 0, 0, 0], np.float32)},
    {"w": np.array([0, 0, -8.5, -9, -6, -7.5, 0, 0, 0, 0], np.float32)},
]


@pytest.mark.parametrize(
    "convention, entry_4",
    [("mergejax", 0), ("fusion_bench", -6), ("mergekit", 6)],  # none, the majority -, +
)
def test_each_convention_signs_a_zero_sum_its_own_way(convention, entry_4):
  merged = mj.merge.ties(_KEEP_BASE, _BALANCE_MODELS, density=0.4, convention=convention)
  np.testing.assert_array_equal(merged["w"], [9, 8, -8.5, -9, entry_4, -7.5, 0, 0, 0, 0])
  assert mj.merge.ties_sign_balance(_KEEP_BASE, _BALANCE_MODELS, 0.4, convention=convention) == 2 - 3


def test_majority_sign_follows_the_balance_and_is_minus_on_a_tie():
  base = {"w": np.zeros(3, np.float32)}
  models = [{"w": np.array([4, 1, 0], np.float32)}, {"w": np.array([-4, 0, 0], np.float32)}]
  fusion_bench = dict(density=1.0, convention="fusion_bench")
  # The balance is 1 (entry 1): entry 0's zero sum is elected +.
  np.testing.assert_array_equal(mj.merge.ties(base, models, **fusion_bench)["w"], [4, 1, 0])
  # Given explicitly, as an out-of-core merge does; 0 selects the negative values.
  np.testing.assert_array_equal(mj.merge.ties(base, models, sign_balance=-7, **fusion_bench)["w"], [-4, 1, 0])
  np.testing.assert_array_equal(mj.merge.ties(base, models, sign_balance=0, **fusion_bench)["w"], [-4, 1, 0])


def test_l1_rescale_keeps_each_leafs_l1_norm_and_is_biased_on_small_leaves():
  base = {"big": np.zeros((4, 5), np.float32), "one": np.zeros((), np.float32)}
  model = {"big": np.linspace(-1, 2, 20, dtype=np.float32).reshape(4, 5), "one": np.float32(3)}
  drop = 0.5
  ones = []
  for seed in range(16):
    key = jax.random.key(seed)
    l1 = mj.merge.dare(base, [model], drop=drop, key=key, convention="mergekit")
    np.testing.assert_allclose(np.abs(l1["big"]).sum(), np.abs(model["big"]).sum(), rtol=1e-5)
    ones.append(float(l1["one"]))
    kept = np.asarray(mj.merge.dare(base, [model], drop=drop, key=key)["big"]) != 0
    np.testing.assert_array_equal(np.asarray(l1["big"]) != 0, kept)  # the same mask
  # A surviving one-entry leaf is scaled by 1: its mean is (1 - drop) 3, not 3.
  assert set(ones) == {0.0, 3.0}
  # The tools' rescale=False: survivors as they are.
  no_rescale = mj.merge.task_vectors.CONVENTIONS["fusion_bench"]._replace(rescale="none")
  plain = mj.merge.dare(base, [model], drop=drop, key=key, convention=no_rescale)["big"]
  np.testing.assert_array_equal(plain, np.where(kept, model["big"], 0))


def test_l1_rescale_leaves_a_tiny_leaf_unscaled():
  base = {"w": np.zeros((4, 5), np.float32)}
  model = {"w": np.full((4, 5), 1e-10, np.float32)}  # ||tau||_1 < 1e-7
  got = mj.merge.dare(base, [model], drop=0.5, key=jax.random.key(0), convention="mergekit")["w"]
  assert sorted(set(np.asarray(got).ravel().tolist())) == [0.0, float(np.float32(1e-10))]


@pytest.mark.parametrize(
    "density, size, ks",
    [(0.7, 10, (7, 8, 7)), (0.29, 100, (29, 29, 28)), (0.2, 3, (1, 1, 1)), (1.0, 5, (5, 5, 5)),
     (0.5, 0, (0, 0, 0)), (0.99, 10, (10, 10, 9))],
)
def test_keep_rules(density, size, ks):
  conventions = mj.merge.task_vectors.CONVENTIONS
  got = tuple(conventions[c].keep_count(density, size) for c in ("mergejax", "fusion_bench", "mergekit"))
  assert got == ks


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("ties", {"convention": "torch"}, "convention must be one of"),
        ("ties", {"convention": mj.merge.task_vectors.Convention("ceil", "up", "l1")}, "convention.zero_sign must be one of"),
        ("dare", {"convention": mj.merge.task_vectors.Convention("ceil", "none", "l2")}, "convention.rescale must be one of"),
        ("ties_thresholds", {"convention": mj.merge.task_vectors.Convention("round", "none", "l1")}, "convention.keep_rule must be one of"),
        ("ties", {"aggregate": "max"}, "aggregate must be one of"),
        ("ties", {"sign_balance": 3}, "the majority zero sign's"),
        ("dare_ties", {"convention": "fusion_bench", "sign_balance": 0.5}, "sign_balance must be an integer"),
    ],
)
def test_bad_conventions_are_rejected(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _MERGES[name]([BAD_INPUT_MODEL, BAD_INPUT_MODEL], **kwargs)
  with pytest.raises(ValueError, match="convention must be one of"):
    mj.merge.ties_sign_balance(BAD_INPUT_BASE, [BAD_INPUT_MODEL], 0.5, convention="torch")


@pytest.mark.parametrize(
    "method, discrete, kwargs",
    [
        # 25 entries at density 0.2: FusionBench's k is 6 (mergejax's 5), and
        # the majority sign (a balance of 1 here) decides zero sums.
        ("ties", True, {"density": 0.2, "trim": "global", "convention": "fusion_bench", "aggregate": "sum"}),
        # At density 0.5, mergekit's k is 12 (mergejax's 13) of the L1-rescaled
        # dropped task vectors, whose threshold differs from the 1 / (1 - drop) ones.
        ("dare_ties", False, {"drop": 0.4, "density": 0.5, "key": _KEY, "trim": "global",
                              "convention": "mergekit", "aggregate": "sum"}),
    ],
)
def test_out_of_core_reproduces_a_non_default_convention(tmp_path, method, discrete, kwargs):
  rng = np.random.default_rng(3)
  base = {"a": {"w": rng.integers(-3, 4, (4, 5)).astype(np.float32)}, "b": rng.integers(-3, 4, 5).astype(np.float32)}
  noise = (lambda s: rng.integers(-2, 3, s)) if discrete else (lambda s: rng.normal(size=s))
  models = [jax.tree.map(lambda x: x + noise(x.shape).astype(np.float32), base) for _ in range(3)]
  paths = [mj.io.save(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
  got = mj.io.restore(mj.io.merge_checkpoints(
      method, paths, tmp_path / "merged", base_path=mj.io.save(tmp_path / "base", base), **kwargs))
  want = getattr(mj.merge, method)(base, models, **kwargs)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
