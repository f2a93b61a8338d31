"""Tests for mergejax.merge.pcb: PCB-Merging against a NumPy transcription of
the paper's equations, its identities, and its errors."""

import importlib

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
from tests.test_task_vectors import reference_k
from tests.test_task_vectors import reference_task_arithmetic
from tests.test_task_vectors import reference_ties

# mj.merge.pcb is the function; the module holds SCOPES and balancing_scores.
pcb_lib = importlib.import_module("mergejax.merge.pcb")


SHAPES = {"block": {"kernel": (3, 4)}, "bias": (4,), "scale": ()}


@st.composite
def base_and_models(draw, discrete=None):
  """A base and 1 to 3 models of one fixed structure (SHAPES).

  One structure keeps the jit caches warm across examples. Entries are
  standard normal, or (when `discrete`, or at random when None) small
  integers, so that magnitudes tie.
  """
  n = draw(st.integers(1, 3))
  if discrete is None:
    discrete = draw(st.booleans())
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  draw_leaf = lambda shape: (
      rng.integers(-3, 4, shape) if discrete else rng.normal(size=shape)
  ).astype(np.float32)
  trees = [jax.tree.map(draw_leaf, SHAPES, is_leaf=lambda x: isinstance(x, tuple)) for _ in range(n + 1)]
  return trees[0], trees[1:]


def _norm(x):
  """Min-max normalisation to [0, 1]; 0 where every entry is equal."""
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def reference_balanced(taus, density):
  """Du et al.'s intra/inter-balancing, drop and rescale over f64[N, D]."""
  n, d = taus.shape
  beta = np.stack([
      _softmax(n * _norm(taus[i] * taus[i]))
      * sum(_softmax(_norm(taus[i] * taus[j])) for j in range(n))
      for i in range(n)
  ])
  k = reference_k(density, d)
  thresholds = np.sort(beta, axis=1)[:, d - k]
  kept = np.where(beta >= thresholds[:, None], beta, 0.0)
  total = kept.sum(axis=0)
  return np.where(total > 0, (kept * taus).sum(axis=0) / np.where(total > 0, total, 1), 0.0)


def reference_pcb(base, models, density, scale, scope):
  base_leaves = _leaves(base)
  # Task vectors in float32, as the library computes them, then float64.
  taus = [
      np.stack([x - b for (_, x) in [_leaves(m)[j] for m in models]]).astype(np.float64)
      for j, (_, b) in enumerate(base_leaves)
  ]
  if scope == "global":
    flat = reference_balanced(np.concatenate([t.reshape(len(models), -1) for t in taus], axis=1), density)
    merged = np.split(flat, np.cumsum([b.size for _, b in base_leaves])[:-1])
  else:
    merged = [reference_balanced(t.reshape(len(models), -1), density) for t in taus]
  return _unflatten(base, [b + scale * m.reshape(b.shape) for (_, b), m in zip(base_leaves, merged)])


densities = st.one_of(st.just(1.0), st.floats(0.05, 1.0))
scopes = st.sampled_from(pcb_lib.SCOPES)


@hypothesis.settings(max_examples=8)
@hypothesis.given(base_and_models(), densities, st.floats(-2.0, 2.0), scopes)
def test_pcb_matches_numpy(case, density, scale, scope):
  base, models = case
  assert_trees_close(
      mj.merge.pcb(base, models, density=density, scale=scale, scope=scope),
      reference_pcb(base, models, density, scale, scope),
  )


@hypothesis.settings(max_examples=8)
@hypothesis.given(base_and_models(), st.integers(1, 3), densities, scopes)
def test_copies_of_one_model_keep_its_largest_entries(case, n, density, scope):
  base, (model, *_) = case
  # beta grows with |tau| when every task is the same: PCB keeps each copy's
  # top-k |tau| entries, as TIES does with one model, and gives back tau there.
  trim = "global" if scope == "global" else "tensor"
  merged = mj.merge.pcb(base, [model] * n, density=density, scale=0.5, scope=scope)
  assert_trees_close(merged, reference_ties(base, [model], density, 0.5, trim))
  if density == 1.0:
    assert_trees_close(merged, reference_task_arithmetic(base, [model], [0.5]))


@hypothesis.settings(max_examples=8)
@hypothesis.given(base_and_models(), st.integers(0, 3), scopes)
def test_pcb_is_invariant_to_model_order(case, shift, scope):
  base, models = case
  shift %= len(models)
  rotated = models[shift:] + models[:shift]
  assert_trees_close(
      mj.merge.pcb(base, rotated, density=0.5, scope=scope),
      mj.merge.pcb(base, models, density=0.5, scope=scope),
  )


@hypothesis.settings(max_examples=3)
@hypothesis.given(base_and_models(), scopes)
def test_models_equal_to_the_base_give_the_base(case, scope):
  base, models = case
  got = mj.merge.pcb(base, [base] * len(models), scope=scope)
  assert_trees_close(got, base, rtol=0, atol=0)


def test_entries_no_model_keeps_stay_at_the_base():
  base = {"w": np.zeros(4, np.float32)}
  models = [{"w": np.array([5, 1, 0.5, 0.1], np.float32)},
            {"w": np.array([0.1, 0.5, 1, 5], np.float32)}]
  # Every tau_1 * tau_2 is 0.5, so inter-balancing is uniform and each model
  # keeps (k = 1) its largest entry; entries 1 and 2 are kept by neither.
  merged = mj.merge.pcb(base, models, density=0.25)
  np.testing.assert_allclose(merged["w"], [5, 0, 0, 5], rtol=1e-6)


def test_inter_balancing_favours_the_entries_tasks_agree_on():
  taus = jnp.array([[1.0, 1.0], [1.0, -1.0]])
  beta = np.asarray(pcb_lib.balancing_scores(taus))
  # Same magnitudes everywhere: only the agreement tau_1 * tau_2 differs, and
  # both tasks score entry 0 (where they agree) above entry 1.
  # intra is uniform (1/2); inter is 1/2 + softmax([1, 0]) = 1/2 + [e, 1] / (1 + e).
  want = 0.5 * (0.5 + np.array([np.e, 1]) / (1 + np.e))
  np.testing.assert_allclose(beta, [want, want], rtol=1e-6)
  assert np.all(beta[:, 0] > beta[:, 1])


@hypothesis.settings(max_examples=5)
@hypothesis.given(base_and_models(), densities)
def test_tensor_scope_one_leaf_at_a_time_reproduces_the_whole_merge(case, density):
  base, models = case
  assert_merges_leaf_by_leaf(
      lambda b, ms: mj.merge.pcb(b, ms, density=density, scope="tensor"), base, models)


def test_pcb_keeps_the_base_dtypes():
  base = {"w": jnp.zeros(8, jnp.bfloat16)}
  models = [{"w": jnp.arange(8, dtype=jnp.bfloat16)}, {"w": jnp.full(8, 2, jnp.bfloat16)}]
  for scope in pcb_lib.SCOPES:
    assert mj.merge.pcb(base, models, scope=scope)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "models, kwargs, match",
    [
        ([], {}, "need at least one model"),
        ([BAD_INPUT_MODEL, BAD_INPUT_WIDER], {}, r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"),
        ([BAD_INPUT_MODEL], {"density": 0.0}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"density": 1.5}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"density": float("nan")}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"scale": float("inf")}, "scale must be finite"),
        ([BAD_INPUT_MODEL], {"scope": "layer"}, "scope must be one of"),
    ],
)
def test_bad_arguments_are_rejected(models, kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.pcb(BAD_INPUT_BASE, models, **kwargs)
