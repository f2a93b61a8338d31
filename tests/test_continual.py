"""Tests for mergejax.merge.continual: OPCM against a NumPy transcription of
its equations, its identities, and its errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_task_vectors import BAD_INPUT_BASE
from tests.test_task_vectors import BAD_INPUT_WIDER

alphas = st.floats(0.0, 0.95)
# A few shapes only: each new one compiles the update again.
SHAPES = st.sampled_from([(3, 4, 2), (5, 1, 2)])


def reference_projection(previous, tau, alpha):
  """FusionBench's full-SVD projection in float64, null directions kept.

  C = U^T tau V with the full bases; C[:r, :r] and C[i, i] for i < rank are
  zeroed, r the first index whose cumulative singular-value share exceeds
  alpha.
  """
  previous, tau = np.asarray(previous, np.float64), np.asarray(tau, np.float64)
  u, sigma, vt = np.linalg.svd(previous, full_matrices=True)
  rank = int(np.sum(sigma > sigma[0] * max(previous.shape) * np.finfo(np.float32).eps))
  share = np.cumsum(sigma[:rank]) / np.sum(sigma[:rank]) if rank else np.ones(0)
  r = int(np.argmax(share > alpha)) if rank else 0
  c = u.T @ tau @ vt.T
  c[:r, :r] = 0
  c[np.arange(rank), np.arange(rank)] = 0
  return u @ c @ vt


def reference_opcm(base, models, alpha, row_axes=None):
  """The whole sequence (1)-(4), leaf by leaf in float64."""
  row_axes = row_axes or {}
  paths = [p for p, _ in mj.tree.leaves_with_paths(base)]
  b = [np.asarray(x, np.float64) for x in jax.tree.leaves(base)]
  total = [np.zeros_like(x) for x in b]
  norms = []
  for model in models:
    taus = [np.asarray(x, np.float64) - y for x, y in zip(jax.tree.leaves(model), b)]
    norms.append(np.sqrt(sum(np.sum(t**2) for t in taus)))
    for j, (path, t) in enumerate(zip(paths, taus)):
      rows = row_axes.get(path, 1 if t.ndim == 2 else None)
      if rows is not None:
        as_matrix = lambda x: x.reshape(int(np.prod(x.shape[:rows])), -1)
        t = reference_projection(as_matrix(total[j]), as_matrix(t), alpha).reshape(t.shape)
      total[j] = total[j] + t
  norm = np.sqrt(sum(np.sum(s**2) for s in total))
  factor = np.mean(norms) / norm if norm > 0 else 0.0
  return jax.tree.unflatten(jax.tree.structure(base), [x + factor * s for x, s in zip(b, total)])


@st.composite
def cases(draw, num_models=3):
  """(base, models): a matrix, a 3-D leaf (row_axes 2), a vector, a scalar."""
  m, n, h = draw(SHAPES)
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  shapes = {"dense": {"kernel": (m, n), "bias": (n,)}, "attention": (m, h, n), "scale": ()}
  make = lambda shape: rng.normal(size=shape).astype(np.float32)
  trees = [jax.tree.map(make, shapes, is_leaf=lambda s: isinstance(s, tuple)) for _ in range(num_models + 1)]
  return trees[0], trees[1:]


ROW_AXES = {"attention": 2}


@hypothesis.settings(max_examples=8)
@hypothesis.given(SHAPES, st.integers(0, 4), alphas, st.integers(0, 2**32 - 1))
def test_projection_matches_numpy_and_is_orthogonal_to_the_merged(shape, rank, alpha, seed):
  m, n, _ = shape
  rng = np.random.default_rng(seed)
  previous = (rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))).astype(np.float32)
  tau = rng.normal(size=(m, n)).astype(np.float32)
  got = np.asarray(mj.merge.opcm_projection(previous, tau, alpha))
  np.testing.assert_allclose(got, reference_projection(previous, tau, alpha), rtol=1e-4, atol=1e-4)
  assert abs(np.sum(got * previous)) <= 1e-4 * np.linalg.norm(previous) * np.linalg.norm(tau) + 1e-6


@hypothesis.settings(max_examples=8)
@hypothesis.given(cases(), alphas)
def test_three_models_match_numpy(case, alpha):
  base, models = case
  merger = mj.merge.opcm(alpha, row_axes=ROW_AXES)
  got = mj.merge.merge_in_order(merger, base, models)
  assert_trees_close(got, reference_opcm(base, models, alpha, ROW_AXES), rtol=1e-4, atol=1e-4)


@hypothesis.settings(max_examples=8)
@hypothesis.given(cases(num_models=1), alphas)
def test_one_model_gives_the_base_plus_its_task_vector(case, alpha):
  base, (model,) = case
  merger = mj.merge.opcm(alpha, row_axes=ROW_AXES)
  state = merger.update(merger.init(base), model)
  np.testing.assert_allclose(mj.merge.opcm_scaling(state), 1.0, rtol=1e-6)  # lambda_1 = 1
  assert_trees_close(merger.finalize(state), model)


def _disjoint(num, rows=2, cols=3, seed=0):
  """A zero base and `num` models that own disjoint rows of every leaf."""
  rng = np.random.default_rng(seed)
  base = {"kernel": np.zeros((num * rows, cols), np.float32), "bias": np.zeros(num * rows, np.float32)}
  models = []
  for i in range(num):
    model = jax.tree.map(np.zeros_like, base)
    model["kernel"][i * rows:(i + 1) * rows] = rng.normal(size=(rows, cols))
    model["bias"][i * rows:(i + 1) * rows] = rng.normal(size=rows)
    models.append(model)
  return base, models


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_disjoint_task_vectors_give_scaled_task_arithmetic_in_any_order(order):
  base, models = _disjoint(3)
  norms = [float(mj.tree.global_norm(m)) for m in models]
  # Disjoint task vectors are orthogonal: ||sum tau_i|| = sqrt(sum ||tau_i||^2).
  scale = np.mean(norms) / np.sqrt(np.sum(np.square(norms)))
  got = mj.merge.merge_in_order(mj.merge.opcm(0.5), base, models, order)
  assert_trees_close(got, mj.merge.task_arithmetic(base, models, scale=float(scale)))


def _generic(seed):
  rng = np.random.default_rng(seed)
  make = lambda: {"kernel": rng.normal(size=(6, 3)).astype(np.float32),
                  "bias": rng.normal(size=6).astype(np.float32)}
  return make(), [make() for _ in range(3)]


def test_order_matters_only_through_the_projection():
  base, models = _generic(seed=1)
  merger = mj.merge.opcm(0.5)
  first = mj.merge.merge_in_order(merger, base, models, [0, 1, 2])
  assert_trees_close(mj.merge.merge_in_order(merger, base, models, [0, 1, 2]), first, rtol=0, atol=0)
  other = mj.merge.merge_in_order(merger, base, models, [2, 1, 0])
  assert not np.allclose(other["kernel"], first["kernel"], atol=1e-3)
  # Without a matrix leaf nothing is projected: every order gives one merge.
  vectors = lambda t: {"bias": t["bias"]}
  assert_trees_close(
      mj.merge.merge_in_order(merger, vectors(base), [vectors(m) for m in models], [2, 1, 0]),
      mj.merge.merge_in_order(merger, vectors(base), [vectors(m) for m in models], [0, 1, 2]),
  )


def test_update_runs_under_jit_and_keeps_the_base_dtypes():
  base, models = _generic(seed=2)
  base = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
  merger = mj.merge.opcm(0.3)
  update = jax.jit(merger.update)
  jitted = merger.init(base)
  for model in models:
    jitted = update(jitted, model)
  assert jitted.projected_sum["kernel"].dtype == jnp.float32
  assert int(jitted.count) == 3
  merged = merger.finalize(jitted)
  assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
  want = reference_opcm(jax.tree.map(np.float32, base), models, 0.3)
  assert_trees_close(merged, want, rtol=2e-2, atol=2e-2)


def test_bad_inputs_are_named():
  merger = mj.merge.opcm()
  mismatch = r"model does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"
  with pytest.raises(ValueError, match=mismatch):
    merger.update(merger.init(BAD_INPUT_BASE), BAD_INPUT_WIDER)
  with pytest.raises(ValueError, match=r"models\[1\] does not match the base"):
    mj.merge.merge_in_order(merger, BAD_INPUT_BASE, [BAD_INPUT_BASE, BAD_INPUT_WIDER])
  with pytest.raises(ValueError, match="need at least one model"):
    mj.merge.merge_in_order(merger, BAD_INPUT_BASE, [])
  with pytest.raises(ValueError, match=r"order must be a permutation of range\(2\), got \[0, 0\]"):
    mj.merge.merge_in_order(merger, BAD_INPUT_BASE, [BAD_INPUT_BASE, BAD_INPUT_BASE], [0, 0])
  with pytest.raises(ValueError, match="no model merged yet"):
    merger.finalize(merger.init(BAD_INPUT_BASE))
  for alpha in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
      mj.merge.opcm(alpha)
  with pytest.raises(ValueError, match="row_axes: params/dense/bias is not a leaf of the base"):
    mj.merge.opcm(row_axes={"params/dense/bias": 1}).init(BAD_INPUT_BASE)
  with pytest.raises(ValueError, match=r"row_axes: params/dense/kernel has shape \(2, 3\)"):
    mj.merge.opcm(row_axes={"params/dense/kernel": 2}).init(BAD_INPUT_BASE)
