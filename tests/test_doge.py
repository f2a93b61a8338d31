"""Tests for mergejax.merge.doge against a NumPy transcription of FusionBench's
DOGE_TA (per-layer objective, projection and projected optimiser steps, in
its torch `(out, in)` layout), its identities, and its errors.

torch is not installed here, so FusionBench itself is not run: the reference
below transcribes `fusion_bench/method/doge_ta/doge_ta.py` (taskvector_loss,
the projection built in `run`, compute_layer_lamdas, optimize_delta's
projected Adam step, and the final masked sum), with the two documented
differences of `doge`: directions with a zero singular value are left out of
the shared basis, and the trim keeps TIES's k entries.
"""

import importlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
from tests.test_task_vectors import reference_kth_largest
from tests.test_task_vectors import reference_thresholds

# The module, which `mj.merge.doge` (the function) hides.
doge_lib = importlib.import_module("mergejax.merge.doge")

SHAPES = {"dense": {"kernel": (6, 4), "bias": (4,)}, "conv": (2, 2, 3, 5)}


def _tree(rng, shapes=SHAPES):
  draw = lambda s: rng.normal(size=s).astype(np.float32)
  return jax.tree.map(draw, shapes, is_leaf=lambda s: isinstance(s, tuple))


def _case(seed, n, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return _tree(rng, shapes), [_tree(rng, shapes) for _ in range(n)]


def _torch_weight(tau):
  """The leaf as FusionBench's `(out, in)` weight: its matrix, transposed."""
  cols = tau.shape[-1] if tau.ndim else 1
  return np.asarray(tau, np.float64).reshape(-1, cols).T


def fb_lamdas(weights, scale):
  """compute_layer_lamdas: scale / ||tau_i|| (0 for a zero task vector)."""
  norms = np.array([np.linalg.norm(w) for w in weights])
  return np.where(norms > 0, scale / np.where(norms > 0, norms, 1), 0)


def fb_loss(weights, lamdas, delta):
  """taskvector_loss, with weights: f64[N, out, in] and delta: f64[out, in]."""
  total = (weights * lamdas[:, None, None]).sum(0)
  delta_total = (delta[None] * lamdas[:, None, None]).sum(0)
  loss = 0.0
  for v in weights:
    loss += ((-v * total - v * delta_total + v * v).sum(axis=1) ** 2).sum()
  return loss


def fb_grad(weights, lamdas, delta):
  """d fb_loss / d delta, by hand: -2 (sum lambda) sum_j e_j v_j, e_j the row sums."""
  merged = (lamdas[:, None, None] * (weights + delta)).sum(0)
  gaps = (weights * (weights - merged)).sum(axis=2)  # f64[N, out]
  return -2 * lamdas.sum() * (gaps[:, :, None] * weights).sum(0)


def fb_projection(weights, rank_fraction):
  """The projection of `run`: P = B B^T over the output space, f64[out, out]."""
  n, out, inp = weights.shape
  m = min(out, inp)
  per_task = m // n
  sum_u = np.zeros((out, m))
  for i, w in enumerate(weights):
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    sum_u[:, i * per_task:(i + 1) * per_task] = u[:, :per_task]
  u_u, s_u, _ = np.linalg.svd(sum_u, full_matrices=False)
  width = min(int(np.floor(rank_fraction * m + 1e-6)), n * per_task)
  assert np.all(s_u[:width] > 1e-6), "test data must give a full shared basis"
  return u_u[:, :width] @ u_u[:, :width].T


def fb_optimise(weights, lamdas, projection, steps, lr, adam):
  """optimize_delta: `steps` Adam (torch defaults) or SGD steps on g - P g."""
  delta = np.zeros(weights.shape[1:])
  m = np.zeros_like(delta)
  v = np.zeros_like(delta)
  b1, b2, eps = 0.9, 0.999, 1e-8
  for t in range(1, steps + 1):
    g = fb_grad(weights, lamdas, delta)
    g = g - projection @ g
    if adam:
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      delta = delta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    else:
      delta = delta - lr * g
  return delta


def fb_doge(base, models, scale, rank_fraction, steps, lr, density, trim, adam):
  """The whole merge, leaf by leaf, in float64."""
  taus_by_model = [[x - b for (_, b), (_, x) in zip(_leaves(base), _leaves(m))] for m in models]
  if trim == "global":
    thresholds = reference_thresholds(base, models, density)
  merged = []
  for j, (_, b) in enumerate(_leaves(base)):
    taus = np.stack([t[j] for t in taus_by_model]).astype(np.float64)
    weights = np.stack([_torch_weight(t) for t in taus])
    lamdas = fb_lamdas(weights, scale)
    delta = fb_optimise(weights, lamdas, fb_projection(weights, rank_fraction), steps, lr, adam)
    delta = delta.T.reshape(b.shape)
    if trim == "tensor":
      at = [reference_kth_largest(t, reference_k(density, t.size)) for t in taus]
    else:
      at = thresholds
    kept = [np.abs(t) >= np.float32(a) for t, a in zip(taus, at)]
    merged.append(b + sum(lam * np.where(k, t + delta, 0) for lam, k, t in zip(lamdas, kept, taus)))
  return _unflatten(base, merged)


def _matrices(seed, n, shape):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _torch_weights(matrices):
  return np.stack([m.T.astype(np.float64) for m in matrices])


# Jit-compiled once per shape: eager op-by-op dispatch compiles every op.
_objective = jax.jit(doge_lib._objective)
_gradient = jax.jit(jax.grad(doge_lib._objective, argnums=2))
_shared_basis = jax.jit(doge_lib._shared_basis, static_argnums=1)
_project = jax.jit(doge_lib._project)


def test_objective_and_its_gradient_match_numpy():
  shape = (6, 4)
  matrices = _matrices(0, 3, shape)
  coefficients = np.array([0.3, -0.2, 0.5], np.float32)
  delta = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  weights = _torch_weights(matrices)
  want = fb_loss(weights, coefficients.astype(np.float64), delta.T.astype(np.float64))
  np.testing.assert_allclose(_objective(matrices, coefficients, delta), want, rtol=1e-5)
  want_grad = fb_grad(weights, coefficients.astype(np.float64), delta.T.astype(np.float64))
  got_grad = np.asarray(_gradient(matrices, coefficients, delta)).T
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)
  # The hand-written NumPy gradient is the loss's derivative.
  offsets = 1e-6 * np.eye(delta.size).reshape(delta.size, *delta.T.shape)
  loss = lambda d: fb_loss(weights, coefficients, d)
  numeric = [(loss(delta.T + e) - loss(delta.T - e)) / 2e-6 for e in offsets]
  np.testing.assert_allclose(np.reshape(numeric, delta.T.shape), want_grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n, shape, rank_fraction", [(3, (6, 4), 0.5), (4, (9, 12), 1 / 6)])
def test_projection_matches_fusionbench_and_is_orthogonal_to_the_subspace(n, shape, rank_fraction):
  matrices = _matrices(n, n, shape)
  k = doge_lib._shared_rank(rank_fraction, min(shape))
  basis = np.asarray(_shared_basis(matrices, k), np.float64)
  want = fb_projection(_torch_weights(matrices), rank_fraction)
  assert basis.shape[1] == np.linalg.matrix_rank(want) > 0
  np.testing.assert_allclose(basis @ basis.T, want, atol=1e-5)
  grad = np.random.default_rng(5).normal(size=shape).astype(np.float32)
  projected = np.asarray(_project(grad, basis.astype(np.float32)), np.float64)
  np.testing.assert_allclose(projected @ basis, 0, atol=1e-5)
  np.testing.assert_allclose(projected, grad - grad @ want, atol=1e-5)


def test_repeated_directions_give_no_arbitrary_basis_vectors():
  # Two copies of one task vector: 2 directions each, the same 2 both times,
  # so the shared subspace has rank 2 although k = 3 is asked for.
  matrices = np.repeat(_matrices(7, 1, (6, 4)), 2, axis=0)
  basis = np.asarray(_shared_basis(matrices, 3))
  np.testing.assert_allclose(basis.T @ basis, np.diag([1.0, 1.0, 0.0]), atol=1e-5)
  _, _, vh = np.linalg.svd(matrices[0])
  np.testing.assert_allclose(basis @ basis.T, vh[:2].T @ vh[:2], atol=1e-5)


@hypothesis.settings(max_examples=8)  # every example runs the NumPy merge
@hypothesis.given(st.integers(0, 2**32 - 1), st.floats(0.05, 1.0), st.floats(0.1, 1.0))
def test_doge_matches_numpy(seed, scale, density):
  base, models = _case(seed, 3)
  got = mj.merge.doge(
      base, models, scale=scale, steps=3, learning_rate=1e-3, rank_fraction=0.5,
      density=density, optimizer=optax.sgd,
  )
  want = fb_doge(base, models, scale, 0.5, 3, 1e-3, density, "global", adam=False)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


def test_one_leaf_at_a_time_reproduces_the_whole_merge():
  base, models = _case(10, 3)
  thresholds = mj.merge.ties_thresholds(base, models, 0.5)
  merge = lambda b, ms: mj.merge.doge(
      b, ms, steps=3, learning_rate=1e-3, rank_fraction=0.5, thresholds=thresholds,
      optimizer=optax.sgd,
  )
  assert_merges_leaf_by_leaf(merge, base, models)


_WIDE = {"w": (12, 8)}  # k = floor(8 / 6) = 1 at the default rank fraction.


@pytest.mark.parametrize("steps, lr", [(400, 1e-4), (4, 0.05)])
def test_adam_steps_with_the_tensor_trim_match_numpy(steps, lr):
  base, models = _case(3, 2, _WIDE)
  got = mj.merge.doge(base, models, steps=steps, learning_rate=lr, trim="tensor")
  want = fb_doge(base, models, 0.07, 1 / 6, steps, lr, 0.3, "tensor", adam=True)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def _applied_correction(base, models, merged, scale):
  """Delta in the torch layout, from a merge with density 1 of one leaf "w":
  merged = base + sum_i lambda_i (tau_i + Delta)."""
  taus = np.stack([m["w"] - base["w"] for m in models]).astype(np.float64)
  lamdas = fb_lamdas(np.stack([_torch_weight(t) for t in taus]), scale)
  arithmetic = base["w"] + np.tensordot(lamdas, taus, axes=1)
  return ((np.asarray(merged["w"], np.float64) - arithmetic) / lamdas.sum()).T, taus, lamdas


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_objective_decreases_and_sgd_stays_out_of_the_shared_subspace(optimizer):
  # The shapes, model counts and static options of the tests above: no compile.
  if optimizer == "adam":
    base, models = _case(13, 2, _WIDE)
    kwargs = dict(scale=2.0, steps=20, learning_rate=0.05, trim="tensor", density=1.0)
  else:
    base, models = _case(13, 3, {"w": (6, 4)})
    kwargs = dict(scale=0.4, steps=4, learning_rate=0.3, rank_fraction=0.5,
                  thresholds=[0.0] * 3, optimizer=optax.sgd)
  merged = mj.merge.doge(base, models, **kwargs)
  delta, taus, lamdas = _applied_correction(base, models, merged, kwargs["scale"])
  weights = np.stack([_torch_weight(t) for t in taus])
  before = fb_loss(weights, lamdas, np.zeros_like(delta))
  assert fb_loss(weights, lamdas, delta) < 0.9 * before
  if optimizer == "sgd":
    np.testing.assert_allclose(fb_projection(weights, 0.5) @ delta, 0, atol=1e-4)
    assert np.abs(delta).max() > 0.1


def test_when_task_arithmetic_reproduces_every_model_the_correction_stays_zero():
  # Two copies of one task vector, with lambda = 1 / 2 (||tau|| = 8 exactly,
  # scale 4): the merged vector is that task vector, every gap is exactly 0,
  # so is every gradient, and Adam's steps too (a float residue of the gap
  # would not do: Adam scales its steps to the learning rate).
  rng = np.random.default_rng(12)
  base = {"w": rng.integers(-3, 4, (12, 8)).astype(np.float32)}
  tau = np.zeros((12, 8), np.float32)
  tau[:8] = rng.choice([-1.0, 1.0], (8, 8))
  model = {"w": base["w"] + tau}
  merged = mj.merge.doge(base, [model, model], scale=4.0, density=1.0, trim="tensor")
  np.testing.assert_array_equal(merged["w"], model["w"])


def test_no_steps_and_no_trim_is_task_arithmetic_with_the_adaptive_coefficients():
  base, models = _case(4, 3)
  got = _leaves(mj.merge.doge(
      base, models, scale=0.6, steps=0, rank_fraction=0.5, density=1.0, optimizer=optax.sgd
  ))
  model_leaves = [_leaves(m) for m in models]
  for j, (path, b) in enumerate(_leaves(base)):
    xs = [ls[j][1] for ls in model_leaves]
    scales = [0.6 / np.linalg.norm(x - b) for x in xs]
    want = mj.merge.task_arithmetic(b, xs, scale=scales)
    np.testing.assert_allclose(got[j][1], want, rtol=1e-5, atol=1e-6, err_msg=path)


def test_a_zero_task_vector_has_a_zero_coefficient_and_dtypes_are_kept():
  base = {"s": jnp.asarray(1.5, jnp.bfloat16)}
  tuned = {"s": jnp.asarray(2.5, jnp.bfloat16)}
  # tau = (0, 1): lambda = (0, 0.5) (no NaN from the zero norm); the
  # objective (0.5 - 0.5 Delta)^2 makes Adam's 4 steps +1e-4 each, so the leaf
  # is 1.5 + 0.5 (1 + 4e-4), 2 in bfloat16.
  merged = mj.merge.doge(base, [base, tuned], scale=0.5, steps=4, density=1.0, trim="tensor")
  assert merged["s"].dtype == jnp.bfloat16
  assert float(merged["s"]) == 2.0
  np.testing.assert_array_equal(doge_lib._coefficients(jnp.zeros((2, 3)), 0.5), [0, 0])


@pytest.mark.parametrize(
    "models, kwargs, match",
    [
        ([], {}, "need at least one model"),
        ([BAD_INPUT_MODEL, BAD_INPUT_WIDER], {},
         r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"),
        ([BAD_INPUT_MODEL], {"scale": float("nan")}, "scale must be finite"),
        ([BAD_INPUT_MODEL], {"steps": -1}, r"steps must be an integer >= 0, got -1"),
        ([BAD_INPUT_MODEL], {"steps": 2.5}, r"steps must be an integer >= 0, got 2.5"),
        ([BAD_INPUT_MODEL], {"steps": True}, "steps must be an integer"),
        ([BAD_INPUT_MODEL], {"learning_rate": 0.0}, "learning_rate must be finite and > 0"),
        ([BAD_INPUT_MODEL], {"learning_rate": float("inf")}, "learning_rate must be finite and > 0"),
        ([BAD_INPUT_MODEL], {"rank_fraction": 1.5}, r"rank_fraction must be in \[0, 1\]"),
        ([BAD_INPUT_MODEL], {"rank_fraction": -0.1}, r"rank_fraction must be in \[0, 1\]"),
        ([BAD_INPUT_MODEL], {"density": 0.0}, r"density must be in \(0, 1\]"),
        ([BAD_INPUT_MODEL], {"trim": "layer"}, "trim must be one of"),
        ([BAD_INPUT_MODEL], {"trim": "tensor", "thresholds": [0.1]}, "pass trim='global'"),
        ([BAD_INPUT_MODEL, BAD_INPUT_MODEL], {"thresholds": [0.1]}, r"2 models but thresholds of shape \(1,\)"),
        ([BAD_INPUT_MODEL], {"optimizer": "adam"}, "optimizer must be a callable"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(models, kwargs, match, monkeypatch):
  for module, name in ((doge_lib, "_doge_leaf"), (doge_lib.tv, "_global_thresholds")):
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("work started"))
  with pytest.raises(ValueError, match=match):
    mj.merge.doge(BAD_INPUT_BASE, models, **kwargs)
