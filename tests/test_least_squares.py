"""Tests for mergejax.merge.least_squares: lstsq oracles and the block structure."""

import warnings

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import stats
from mergejax import trace
from mergejax.merge import combine
from mergejax.merge import least_squares


@hypothesis.given(st.integers(1, 12), st.integers(1, 5), st.sampled_from([0.0, 1e-3, 0.3]), st.integers(0, 99))
def test_ridge_solve_is_lstsq_of_the_augmented_system(d, k, ridge, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((d + 5, d))
  y, w0 = rng.standard_normal((d + 5, k)), rng.standard_normal((d, k))
  g = x.T @ x
  lam = ridge * np.trace(g) / d
  want = np.linalg.lstsq(np.vstack([x, np.sqrt(lam) * np.eye(d)]), np.vstack([y, np.sqrt(lam) * w0]),
                         rcond=None)[0]
  got = least_squares.ridge_solve(jnp.asarray(g, jnp.float32), jnp.asarray(x.T @ y, jnp.float32),
                                  jnp.asarray(w0, jnp.float32), ridge)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_failed_factorisation_warns_and_solves_in_float64():
  g = np.diag([1.0, 0.0, -1.0]).astype(np.float32)  # indefinite: Cholesky gives NaN
  with pytest.warns(RuntimeWarning, match="layer/x"):
    w = least_squares.ridge_solve(jnp.asarray(g), jnp.ones((3, 1)), jnp.zeros((3, 1)), 0.0, "layer/x")
  assert np.all(np.isfinite(w))


def _uses(fn, kernel, x):
  _, uses = trace.kernel_uses(fn)({"k": kernel}, x)
  return uses[("k",)][0]


@pytest.mark.parametrize("layout,strides,padding,dilation", [
    (("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1)),
    (("NHWC", "HWIO", "NHWC"), (2, 1), "VALID", (2, 1)),
    (("NCHW", "OIHW", "NCHW"), (2, 2), ((1, 0), (2, 1)), (1, 1)),
])
def test_conv_rows_times_the_kernel_matrix_is_the_convolution(layout, strides, padding, dilation):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3) if layout[0] == "NHWC" else (2, 3, 9, 9)), jnp.float32)
  kshape = (3, 2, 3, 4) if layout[1] == "HWIO" else (4, 3, 3, 2)
  kernel = jnp.asarray(rng.standard_normal(kshape), jnp.float32)
  fn = lambda v, x: jax.lax.conv_general_dilated(x, v["k"], strides, padding, rhs_dilation=dilation,
                                                 dimension_numbers=layout)
  use = _uses(fn, kernel, x)
  plan = least_squares.kernel_plan(use, kernel.shape)
  view = combine.leaf_view(kernel.shape, [])
  w = least_squares._as_matrix(kernel, view.shape, least_squares.split_positions(view, plan.in_axes),
                               least_squares.split_positions(view, plan.out_axes))
  out = fn({"k": kernel}, x)
  out = jnp.moveaxis(out, 1, -1) if layout[2] == "NCHW" else out
  rows = least_squares.design_rows(use, kernel.shape)
  np.testing.assert_allclose(rows @ w, out.reshape(2, -1, 4), rtol=1e-4, atol=1e-4)


def test_dense_rows_with_several_contracted_axes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)  # [batch, tokens, heads, head_dim]
  kernel = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)  # [heads, head_dim, embed]
  fn = lambda v, x: jnp.einsum("bthd,hde->bte", x, v["k"])
  use = _uses(fn, kernel, x)
  plan = least_squares.kernel_plan(use, kernel.shape)
  assert sorted(plan.in_axes) == [0, 1] and plan.out_axes == (2,)
  view = combine.leaf_view(kernel.shape, [])
  w = least_squares._as_matrix(kernel, view.shape, plan.in_axes, plan.out_axes)
  rows = least_squares.design_rows(use, kernel.shape)
  np.testing.assert_allclose(rows @ w, fn({"k": kernel}, x), rtol=1e-4, atol=1e-4)


def test_grouped_convolutions_are_refused():
  x = jnp.ones((1, 5, 5, 4))
  fn = lambda v, x: jax.lax.conv_general_dilated(x, v["k"], (1, 1), "SAME", feature_group_count=2,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  use = _uses(fn, jnp.ones((3, 3, 2, 4)), x)
  with pytest.raises(ValueError, match="grouped convolution"):
    least_squares.kernel_plan(use, (3, 3, 2, 4), "conv")


def _merged_features(x_a, x_b, m: combine.UnitMap):
  """The merged layout of features [rows, n] by the UnitMap, in NumPy."""
  z = np.concatenate([x_a, x_b], axis=1)
  return sum(m.weight[:, k] * z[:, m.index[:, k]] for k in range(2))


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.integers(2, 7), st.integers(2, 6), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
                  st.sampled_from([0.0, 1e-2]), st.booleans(), st.integers(0, 999))
def test_each_block_is_lstsq_of_the_explicit_merged_problem(d_in, d_out, r_in, r_out, ridge, dead, seed):
  """With `dead`, input unit 0 is 0 in both models: without a ridge its Gram
  is singular, the Cholesky factorisation fails, and the float64 fallback
  (with a warning) must still give the least-squares fit."""
  rng = np.random.default_rng(seed)
  rows = 40
  x_a, x_b = rng.standard_normal((rows, d_in)), rng.standard_normal((rows, d_in))
  if dead:
    x_a[:, 0] = x_b[:, 0] = 0.0
  w_a, w_b = rng.standard_normal((d_in, d_out)), rng.standard_normal((d_in, d_out))
  m_in = combine.partial_map(rng.random(d_in) < r_in)
  m_out = combine.partial_map(rng.random(d_out) < r_out)
  maps = {"in": m_in, "out": m_out}
  refs = [("in", combine.spec_lib.AxisRef(("k",), 0)), ("out", combine.spec_lib.AxisRef(("k",), 1))]
  view = combine.leaf_view((d_in, d_out), refs)
  axes = [combine.Axis(0, m_in, True), combine.Axis(1, m_out, False)]
  w0 = combine.combine_leaf([jnp.asarray(w_a, jnp.float32), jnp.asarray(w_b, jnp.float32)], axes)
  z = np.concatenate([x_a, x_b], axis=1)
  gram = stats.Gram(jnp.float32(rows), jnp.asarray(z.T @ z, jnp.float32), (d_in, d_in))
  plan = least_squares.KernelPlan((0,), (1,))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w, report = least_squares.solve_layer(("k",), gram, (w_a, w_b), w0, view, plan, maps, ridge=ridge,
                                          condition=False)
  failed = [c for c in caught if "k: the Cholesky factorisation" in str(c.message)]
  assert bool(failed) == (dead and ridge == 0), [str(c.message) for c in caught]
  # The oracle: explicit merged inputs and targets, one lstsq per output block.
  x = _merged_features(x_a, x_b, m_in) / np.sqrt(rows)
  y = _merged_features(x_a @ w_a, x_b @ w_b, m_out) / np.sqrt(rows)
  w0 = np.asarray(w0, np.float64)
  own = lambda m, model: np.array([((m.index[p] >= model * m.size) & (m.index[p] < (model + 1) * m.size)
                                    & (m.weight[p] > 0)).any() for p in range(m.width)])
  in_a, in_b, out_a, out_b = own(m_in, 0), own(m_in, 1), own(m_out, 0), own(m_out, 1)
  want = np.zeros_like(w0)
  for a, b in ((True, True), (True, False), (False, True)):
    q = np.flatnonzero((out_a == a) & (out_b == b))
    p = np.flatnonzero((in_a & a) | (in_b & b))
    if not q.size:
      continue
    lam = ridge * np.trace(x[:, p].T @ x[:, p]) / p.size
    aug_x = np.vstack([x[:, p], np.sqrt(lam) * np.eye(p.size)])
    aug_y = np.vstack([y[:, q], np.sqrt(lam) * w0[np.ix_(p, q)]])
    want[np.ix_(p, q)] = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
  fitted = lambda w: np.sum((x @ w - y) ** 2) / np.sum(y**2)
  np.testing.assert_allclose(fitted(np.asarray(w)), fitted(want), rtol=1e-3, atol=1e-5)
  if ridge > 0:  # then the solution is unique
    np.testing.assert_allclose(w, want, rtol=1e-2, atol=1e-2 * max(1.0, np.abs(want).max()))
  # Structural zeros: outputs kept from A read nothing kept only from B, and vice versa.
  w = np.asarray(w)
  assert np.all(w[np.ix_(~in_a, out_a & ~out_b)] == 0) and np.all(w[np.ix_(~in_b, out_b & ~out_a)] == 0)
  np.testing.assert_allclose(report.residual_after, fitted(np.asarray(w)), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(report.residual_before, fitted(w0), rtol=1e-3, atol=1e-4)
  assert report.blocks == tuple(int(np.sum((out_a == a) & (out_b == b))) for a, b in
                                ((True, True), (True, False), (False, True)))


def test_the_condition_estimate_is_the_gram_blocks_condition_number():
  """The report's condition (power iterations, not an eigendecomposition) against NumPy's, on a layer
  with all three blocks: the merged block reads every input, so its condition is the largest."""
  rng = np.random.default_rng(3)
  d_in, d_out, rows = 6, 5, 60
  x_a = rng.standard_normal((rows, d_in)) * np.linspace(0.2, 3.0, d_in) + 0.5
  x_b = rng.standard_normal((rows, d_in)) + x_a
  m_in, m_out = combine.partial_map(np.arange(d_in) < 3), combine.partial_map(np.arange(d_out) < 2)
  refs = [("in", combine.spec_lib.AxisRef(("k",), 0)), ("out", combine.spec_lib.AxisRef(("k",), 1))]
  z = np.concatenate([x_a, x_b], axis=1)
  gram = stats.Gram(jnp.float32(rows), jnp.asarray(z.T @ z, jnp.float32), (d_in, d_in))
  w = rng.standard_normal((d_in, d_out))
  _, report = least_squares.solve_layer(("k",), gram, (w, w), jnp.zeros((9, 8)), combine.leaf_view(w.shape, refs),
                                        least_squares.KernelPlan((0,), (1,)), {"in": m_in, "out": m_out},
                                        ridge=1e-3)
  assert report.blocks == (2, 3, 3)
  x = _merged_features(x_a, x_b, m_in)
  np.testing.assert_allclose(report.condition, np.linalg.cond(x.T @ x), rtol=1e-2)


def _layer(rng, d_in, d_out, rows, merged_in, merged_out):
  """A Dense layer of two models with partial maps: (gram, kernels, w0, view, plan, maps, x_a, x_b)."""
  x_a, x_b = rng.standard_normal((rows, d_in)), rng.standard_normal((rows, d_in))
  w_a, w_b = rng.standard_normal((d_in, d_out)), rng.standard_normal((d_in, d_out))
  maps = {"in": combine.partial_map(merged_in), "out": combine.partial_map(merged_out)}
  refs = [("in", combine.spec_lib.AxisRef(("k",), 0)), ("out", combine.spec_lib.AxisRef(("k",), 1))]
  axes = [combine.Axis(0, maps["in"], True), combine.Axis(1, maps["out"], False)]
  w0 = combine.combine_leaf([jnp.asarray(w_a, jnp.float32), jnp.asarray(w_b, jnp.float32)], axes)
  z = np.concatenate([x_a, x_b], axis=1)
  gram = stats.Gram(jnp.float32(rows), jnp.asarray(z.T @ z, jnp.float32), (d_in, d_in))
  return gram, (w_a, w_b), w0, combine.leaf_view((d_in, d_out), refs), least_squares.KernelPlan((0,), (1,)), maps


def test_the_device_solve_equals_the_host_solve_and_the_lstsq_oracle():
  """backend="device" (one jitted program per block, as on a GPU) on this CPU: the same kernel and report as the
  host's LAPACK path, both the explicit lstsq of each block; the default on CPU Grams is the host."""
  rng = np.random.default_rng(5)
  d_in, d_out, rows, ridge = 6, 5, 50, 1e-2
  layer = _layer(rng, d_in, d_out, rows, np.arange(d_in) < 3, np.arange(d_out) < 2)
  gram, kernels, w0, view, plan, maps = layer
  host = least_squares.solve_layer(("k",), *layer, ridge=ridge, backend="host")
  device = least_squares.solve_layer(("k",), *layer, ridge=ridge, backend="device")
  default = least_squares.solve_layer(("k",), *layer, ridge=ridge)
  assert host[1].blocks == device[1].blocks == (2, 3, 3)
  np.testing.assert_array_equal(default[0], host[0])
  np.testing.assert_allclose(device[0], host[0], rtol=1e-4, atol=1e-4)
  for field in ("residual_before", "residual_after", "condition"):
    np.testing.assert_allclose(getattr(device[1], field), getattr(host[1], field), rtol=1e-3, atol=1e-5)
  z = np.asarray(gram.gram, np.float64)  # the oracle: lstsq of each block's explicit merged problem
  x_ab = np.linalg.cholesky(z + 1e-9 * np.eye(2 * d_in)).T / np.sqrt(rows)  # any X with X^T X = G / rows
  x = _merged_features(x_ab[:, :d_in], x_ab[:, d_in:], maps["in"])
  y = _merged_features(x_ab[:, :d_in] @ kernels[0], x_ab[:, d_in:] @ kernels[1], maps["out"])
  want = np.zeros((x.shape[1], y.shape[1]))
  for p, q in (([0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1]), ([0, 1, 2, 3, 4, 5], [2, 3, 4]), ([0, 1, 2, 6, 7, 8], [5, 6, 7])):
    lam = ridge * np.trace(x[:, p].T @ x[:, p]) / len(p)
    want[np.ix_(p, q)] = np.linalg.lstsq(np.vstack([x[:, p], np.sqrt(lam) * np.eye(len(p))]),
                                         np.vstack([y[:, q], np.sqrt(lam) * np.asarray(w0)[np.ix_(p, q)]]),
                                         rcond=None)[0]
  np.testing.assert_allclose(device[0], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
  with pytest.raises(ValueError, match="backend"):
    least_squares.solve_layer(("k",), *layer, ridge=ridge, backend="gpu")


def test_the_device_solve_compiles_once_per_block_shape():
  """A second layer of the same shapes (other weights and maps of the same sizes) compiles nothing."""
  rng = np.random.default_rng(6)
  layers = [_layer(rng, 5, 4, 30, rng.permutation(5) < 2, rng.permutation(4) < 2) for _ in range(2)]
  compiles = []

  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":  # jax's own event name
      compiles.append(duration_secs)

  least_squares.solve_layer(("k",), *layers[0], ridge=1e-3, backend="device", condition=False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    kernel, report = least_squares.solve_layer(("k",), *layers[1], ridge=1e-3, backend="device", condition=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [] and report.blocks == (2, 2, 2)
  np.testing.assert_allclose(kernel, least_squares.solve_layer(("k",), *layers[1], ridge=1e-3, backend="host")[0],
                             rtol=1e-4, atol=1e-4)


def test_a_layer_kept_whole_keeps_its_weights_without_a_solve(monkeypatch):
  """Inputs and outputs kept whole (nothing merged): each block's inputs are one model's own features and its
  targets that model's outputs, so the combined weights fit exactly. The host returns them without factorising
  (residuals 0), and equals the device path, which solves every block."""
  rng = np.random.default_rng(7)
  layer = _layer(rng, 6, 5, 40, np.zeros(6, bool), np.zeros(5, bool))
  device = least_squares.solve_layer(("k",), *layer, ridge=1e-3, backend="device")
  solves = []
  real_solve = least_squares._host_solve
  monkeypatch.setattr(least_squares, "_host_solve", lambda *a: solves.append(a) or real_solve(*a))
  kernel, report = least_squares.solve_layer(("k",), *layer, ridge=1e-3, backend="host")
  assert solves == [] and report.blocks == (0, 5, 5)
  np.testing.assert_array_equal(kernel, layer[2])
  assert abs(report.residual_before) < 1e-6 and abs(report.residual_after) < 1e-6
  np.testing.assert_allclose(kernel, device[0], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(report.residual_after, device[1].residual_after, atol=1e-4)
  partial = _layer(rng, 6, 5, 40, np.arange(6) < 1, np.zeros(5, bool))  # one merged input: a real solve
  least_squares.solve_layer(("k",), *partial, ridge=1e-3, backend="host")
  assert len(solves) == 2
