"""Tests for mergejax.merge.regmean: NumPy oracles, least-squares identities, errors."""

import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

W1, B1, W2, B2 = ("dense_0", "kernel"), ("dense_0", "bias"), ("dense_1", "kernel"), ("dense_1", "bias")


def _np_shrink(gram, alpha):
  """Off-diagonal entries times alpha, the diagonal kept."""
  return np.where(np.eye(len(gram), dtype=bool), gram, alpha * gram)


def _np_regmean(grams, kernels, alpha):
  """(sum_i G~_i)^{-1} sum_i G~_i W_i in float64, W_i read as (d, -1)."""
  d = len(grams[0])
  shrunk = [_np_shrink(np.asarray(g, np.float64), alpha) for g in grams]
  rhs = sum(s @ np.asarray(w, np.float64).reshape(d, -1) for s, w in zip(shrunk, kernels))
  return np.linalg.solve(sum(shrunk), rhs).reshape(np.shape(kernels[0]))


def _np_gram(rows):
  """X^T X / rows of f[..., d] features."""
  x = np.asarray(rows, np.float64).reshape(-1, np.shape(rows)[-1])
  return x.T @ x / len(x)


def _close(got, want, rtol=2e-3):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


def _mlp(v, x):
  h = jax.nn.relu(x @ v["dense_0"]["kernel"] + v["dense_0"]["bias"])
  return h @ v["dense_1"]["kernel"] + v["dense_1"]["bias"]


def _mlp_variables(seed, d_in=5, hidden=6, d_out=3):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
  return {"dense_0": {"kernel": f(d_in, hidden), "bias": f(hidden) * 0.3},
          "dense_1": {"kernel": f(hidden, d_out), "bias": f(d_out)}}


def _data(seed, rows, d_in=5, batch=16):
  x = np.random.default_rng(seed).standard_normal((rows, d_in)).astype(np.float32)
  return x, [x[i:i + batch] for i in range(0, rows, batch)]


def _np_hidden(v, x):
  return np.maximum(x @ np.asarray(v["dense_0"]["kernel"], np.float64) + np.asarray(v["dense_0"]["bias"]), 0)


def _leaf(v, path):
  for k in path:
    v = v[k]
  return v


def _assert_trees_close(got, want, rtol=2e-3):
  jax.tree.map(lambda a, b: _close(np.asarray(a), np.asarray(b), rtol), got, want)


def _spd(rng, d):
  a = rng.standard_normal((d, d + 2))
  return a @ a.T / d + 0.1 * np.eye(d)


# Few distinct shapes (each compiles once per test); the values vary freely.
@hypothesis.given(st.sampled_from([(3, 2, 2), (1, 4, 3)]), st.booleans(), st.floats(0.0, 1.0), st.integers(0, 999))
def test_the_closed_form_is_numpy_solve_and_other_leaves_the_average(shape, both_axes, alpha, seed):
  rng = np.random.default_rng(seed)
  n = 3
  a, b, k = shape
  d = a * b if both_axes else a
  models = [{"w": jnp.asarray(rng.standard_normal((a, b, k)), jnp.float32),
             "bias": jnp.asarray(rng.standard_normal(k), jnp.float32)} for _ in range(n)]
  grams = [{("w",): jnp.asarray(_spd(rng, d), jnp.float32)} for _ in range(n)]
  merged = mj.merge.regmean(models, grams, alpha=alpha)
  want = _np_regmean([g[("w",)] for g in grams], [m["w"] for m in models], alpha)
  _close(merged["w"], want)
  _close(merged["bias"], np.mean([m["bias"] for m in models], 0), 1e-6)


@hypothesis.given(st.floats(0.0, 1.0), st.integers(0, 999))
def test_identity_grams_give_the_plain_average(alpha, seed):
  n = 3
  models = [_mlp_variables(seed + i) for i in range(n)]
  grams = [{W1: jnp.eye(5), W2: jnp.eye(6)} for _ in range(n)]
  merged = mj.merge.regmean(models, grams, alpha=alpha)
  _assert_trees_close(merged, jax.tree.map(lambda *x: np.mean(x, 0), *models), 1e-5)


@hypothesis.given(st.sampled_from([2, 3]), st.sampled_from([1, 4]), st.integers(0, 999))
def test_alpha_zero_weighs_each_input_row_by_its_diagonal(n, d, seed):
  rng = np.random.default_rng(seed)
  grams = [_spd(rng, d) for _ in range(n)]
  kernels = [rng.standard_normal((d, 3)) for _ in range(n)]
  merged = mj.merge.regmean([{"w": jnp.asarray(w, jnp.float32)} for w in kernels],
                            [{("w",): jnp.asarray(g, jnp.float32)} for g in grams], alpha=0.0)
  diag = np.stack([np.diag(g) for g in grams])  # [n, d]
  want = np.einsum("nd,ndk->dk", diag, np.stack(kernels)) / diag.sum(0)[:, None]
  _close(merged["w"], want, 1e-5)


def test_features_no_model_sees_keep_the_average_row():
  rng = np.random.default_rng(0)
  grams = [_spd(rng, 4) for _ in range(2)]
  for g in grams:
    g[2, :] = g[:, 2] = 0.0
  kernels = [rng.standard_normal((4, 3)) for _ in range(2)]
  merged = mj.merge.regmean([{"w": jnp.asarray(w, jnp.float32)} for w in kernels],
                            [{("w",): jnp.asarray(g, jnp.float32)} for g in grams], alpha=0.7)
  seen = [0, 1, 3]
  want = _np_regmean([g[np.ix_(seen, seen)] for g in grams], [w[seen] for w in kernels], 0.7)
  _close(np.asarray(merged["w"])[seen], want)
  _close(merged["w"][2], np.mean([w[2] for w in kernels], 0), 1e-6)


def test_grams_without_cholesky_factorisation_warn_naming_the_kernel_and_are_solved():
  rng = np.random.default_rng(1)
  grams = [np.diag([1.0, -2.0, 3.0]) + 0.1 * _spd(rng, 3) for _ in range(2)]  # indefinite, invertible
  kernels = [rng.standard_normal((3, 2)) for _ in range(2)]
  with pytest.warns(RuntimeWarning, match="layer/w"):
    merged = mj.merge.regmean([{"layer": {"w": jnp.asarray(w, jnp.float32)}} for w in kernels],
                              [{("layer", "w"): jnp.asarray(g, jnp.float32)} for g in grams], alpha=1.0)
  _close(merged["layer"]["w"], _np_regmean(grams, kernels, 1.0))


def _weighted_lstsq(xs, ws):
  """argmin_W sum_i ||X_i W - X_i W_i||^2 / rows_i, by numpy.linalg.lstsq on the stacked rows."""
  x = np.concatenate([xi / np.sqrt(len(xi)) for xi in xs])
  y = np.concatenate([xi @ np.asarray(wi, np.float64) / np.sqrt(len(xi)) for xi, wi in zip(xs, ws)])
  return np.linalg.lstsq(x, y, rcond=None)[0]


def test_exact_grams_with_alpha_one_give_the_stacked_least_squares_dense():
  models = [_mlp_variables(1), _mlp_variables(2)]
  (xa, batches_a), (xb, batches_b) = _data(3, 40), _data(4, 27)
  grams = [mj.merge.regmean_grams(_mlp, v, b) for v, b in zip(models, (batches_a, batches_b))]
  merged = mj.merge.regmean(models, grams, alpha=1.0)
  _close(merged["dense_0"]["kernel"], _weighted_lstsq([xa, xb], [m["dense_0"]["kernel"] for m in models]))
  hidden = [_np_hidden(v, x) for v, x in zip(models, (xa, xb))]
  _close(merged["dense_1"]["kernel"], _weighted_lstsq(hidden, [m["dense_1"]["kernel"] for m in models]))
  for path in (B1, B2):
    _close(_leaf(merged, path), np.mean([_leaf(m, path) for m in models], 0), 1e-6)


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(3, (2, 2), strides=(2, 1), padding="VALID")(x))
    return nn.Dense(2)(x.mean((1, 2)))


def _np_patches(x, kh, kw, strides, pad):
  """f[n, h, w, c] -> f[n, positions, kh * kw * c], features in (kh, kw, c) order."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  (sh, sw), (h, w) = strides, x.shape[1:3]
  return np.stack([x[:, i:i + kh, j:j + kw].reshape(len(x), -1)
                   for i in range(0, h - kh + 1, sh) for j in range(0, w - kw + 1, sw)], 1)


def _np_cnn_inputs(v, x):
  """Each kernel's input rows [rows, d] in the kernel's (kh, kw, c) order, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  n = len(x)
  p0 = _np_patches(x, 3, 3, (1, 1), 1)
  h = np.maximum(p0 @ p["Conv_0"]["kernel"].reshape(-1, 4) + p["Conv_0"]["bias"], 0).reshape(n, 6, 6, 4)
  p1 = _np_patches(h, 2, 2, (2, 1), 0)
  h = np.maximum(p1 @ p["Conv_1"]["kernel"].reshape(-1, 3) + p["Conv_1"]["bias"], 0)
  pooled = h.mean(1)
  out = pooled @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  return [p0.reshape(-1, p0.shape[-1]), p1.reshape(-1, p1.shape[-1]), pooled], out


def test_exact_grams_with_alpha_one_give_the_stacked_least_squares_conv():
  model = _CNN()
  rng = np.random.default_rng(5)
  xs = [rng.standard_normal((n, 6, 6, 2)).astype(np.float32) for n in (20, 13)]
  shapes = jax.eval_shape(model.init, jax.random.key(0), xs[0][:1])
  models = [jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / 2, jnp.float32), shapes)
            for _ in range(2)]
  inputs = []
  for v, x in zip(models, xs):
    rows, out = _np_cnn_inputs(v, x)
    _close(model.apply(v, x), out, 1e-4)  # the NumPy reference is the model
    inputs.append(rows)
  grams = [mj.merge.regmean_grams(model.apply, v, [x[:8], x[8:16], x[16:]]) for v, x in zip(models, xs)]
  merged = mj.merge.regmean(models, grams, alpha=1.0)
  for layer, name in enumerate(("Conv_0", "Conv_1", "Dense_0")):
    kernels = [m["params"][name]["kernel"] for m in models]
    _close(grams[0][("params", name, "kernel")], _np_gram(inputs[0][layer]), 1e-4)
    want = _weighted_lstsq([rows[layer] for rows in inputs], [np.reshape(k, (-1, k.shape[-1])) for k in kernels])
    _close(merged["params"][name]["kernel"], want.reshape(kernels[0].shape))


def test_a_shared_kernel_stacks_the_rows_of_its_uses():
  fn = lambda v, x: jnp.tanh(x @ v["w"]) @ v["w"]
  v = {"w": jnp.asarray(np.random.default_rng(6).standard_normal((4, 4)) / 2, jnp.float32)}
  x, batches = _data(7, 24, d_in=4, batch=10)
  hidden = np.tanh(x @ np.asarray(v["w"], np.float64))
  gram = mj.merge.regmean_grams(fn, v, batches)[("w",)]
  _close(gram, _np_gram(np.concatenate([x, hidden])), 1e-4)


def test_a_kernel_read_on_trailing_axes_is_named_and_left_out():
  fn = lambda v, x: x @ v["u"] + jax.lax.dot_general(x, v["w"], (((1,), (1,)), ((), ())))
  v = {"u": jnp.ones((3, 2)), "w": jnp.ones((2, 3))}
  with pytest.warns(UserWarning, match="^regmean_grams: w read their input"):
    grams = mj.merge.regmean_grams(fn, v, [np.ones((4, 3), np.float32)])
  assert list(grams) == [("u",)]


def test_grams_agree_on_one_and_eight_devices():
  v = _mlp_variables(8)
  _, batches = _data(9, 45)  # batches of 16, 16 and 13 rows: padded and masked
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  eight = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  g1 = mj.merge.regmean_grams(_mlp, v, batches, mesh=one)
  g8 = mj.merge.regmean_grams(_mlp, v, batches, mesh=eight)
  assert list(g1) == list(g8) == [W1, W2]
  _assert_trees_close(g1, g8, 1e-5)


def test_merging_a_model_with_itself_returns_it():
  v = _mlp_variables(10)
  (_, batches_a), (_, batches_b) = _data(11, 30), _data(12, 20)
  grams = [mj.merge.regmean_grams(_mlp, v, b) for b in (batches_a, batches_b)]
  _assert_trees_close(mj.merge.regmean([v, v], grams), v, 1e-4)
  _assert_trees_close(mj.merge.regmean_plus_plus(_mlp, [v, v], [batches_a, batches_b]), v, 1e-4)


def test_plus_plus_on_a_one_layer_model_is_regmean():
  fn = lambda v, x: x @ v["dense"]["kernel"] + v["dense"]["bias"]
  models = [{"dense": {"kernel": jnp.asarray(np.random.default_rng(s).standard_normal((5, 3)), jnp.float32),
                       "bias": jnp.full((3,), float(s))}} for s in range(3)]
  data = [_data(20 + s, 20 + 5 * s)[1] for s in range(3)]
  grams = [mj.merge.regmean_grams(fn, v, b) for v, b in zip(models, data)]
  want = mj.merge.regmean(models, grams, alpha=0.8)
  _assert_trees_close(mj.merge.regmean_plus_plus(fn, models, data, alpha=0.8), want, 1e-5)


def test_plus_plus_fits_each_layer_to_the_merged_layers_before_it():
  models = [_mlp_variables(13), _mlp_variables(14)]
  (xa, batches_a), (xb, batches_b) = _data(15, 36), _data(16, 25)
  merged = mj.merge.regmean_plus_plus(_mlp, models, [batches_a, batches_b], alpha=0.9)
  w1 = _np_regmean([_np_gram(x) for x in (xa, xb)], [m["dense_0"]["kernel"] for m in models], 0.9)
  b1 = np.mean([m["dense_0"]["bias"] for m in models], 0)
  hybrid = {"dense_0": {"kernel": w1, "bias": b1}}
  hidden = [_np_hidden(hybrid, x) for x in (xa, xb)]
  w2 = _np_regmean([_np_gram(h) for h in hidden], [m["dense_1"]["kernel"] for m in models], 0.9)
  _close(merged["dense_0"]["kernel"], w1)
  _close(merged["dense_1"]["kernel"], w2)
  for path in (B1, B2):
    _close(_leaf(merged, path), np.mean([_leaf(m, path) for m in models], 0), 1e-6)


def test_plus_plus_with_every_leaf_in_one_block_is_regmean():
  models = [_mlp_variables(17), _mlp_variables(18)]
  data = [_data(19, 30)[1], _data(20, 22)[1]]
  grams = [mj.merge.regmean_grams(_mlp, v, b) for v, b in zip(models, data)]
  merged = mj.merge.regmean_plus_plus(_mlp, models, data, blocks=lambda path: "all")
  _assert_trees_close(merged, mj.merge.regmean(models, grams), 1e-5)


def _gram_dicts(n=2):
  return [{W1: jnp.eye(5), W2: jnp.eye(6)} for _ in range(n)]


@pytest.mark.parametrize("models,grams,alpha,match", [
    ([_mlp_variables(0), {"dense_0": _mlp_variables(0)["dense_0"]}], _gram_dicts(), 0.9, "dense_1"),
    ([_mlp_variables(0), _mlp_variables(0, hidden=7)], _gram_dicts(), 0.9, "dense_0/bias: \\(6,\\) vs \\(7,\\)"),
    ([_mlp_variables(0)] * 2, _gram_dicts(3), 0.9, "2 models but 3 Gram dicts"),
    ([_mlp_variables(0)] * 2, [{W1: jnp.eye(5)}, {W1: jnp.eye(6)}], 0.9, "grams\\[1\\]\\[dense_0/kernel\\] has shape"),
    ([_mlp_variables(0)] * 2, [{W1: jnp.eye(3)}] * 2, 0.9, "dense_0/kernel\\] has shape \\(3, 3\\)"),
    ([_mlp_variables(0)] * 2, [{B1: jnp.eye(6), W1: jnp.ones((5, 4))}] * 2, 0.9, "dense_0/kernel\\] has shape"),
    ([_mlp_variables(0)] * 2, [{W1: jnp.eye(5)}, {W2: jnp.eye(6), W1: jnp.eye(5)}], 0.9,
     "dense_1/kernel has a Gram in grams\\[1\\] but not in grams\\[0\\]"),
    ([_mlp_variables(0)] * 2, [{("dense_2", "kernel"): jnp.eye(5)}] * 2, 0.9, "dense_2"),
    ([_mlp_variables(0)] * 2, [{"dense_0/kernel": jnp.eye(5)}] * 2, 0.9, "not the path tuple"),
    ([_mlp_variables(0)] * 2, [{W1: jnp.eye(5)}, {W1: jnp.eye(5).at[1, 2].set(jnp.nan)}], 0.9,
     "grams\\[1\\]: dense_0/kernel has 1 NaN"),
    ([_mlp_variables(0)] * 2, _gram_dicts(), 1.5, "alpha must be in \\[0, 1\\]"),
    ([_mlp_variables(0)] * 2, _gram_dicts(), -0.1, "alpha"),
    ([_mlp_variables(0)] * 2, _gram_dicts(), float("nan"), "alpha"),
    ([], [], 0.9, "no models"),
])
def test_regmean_errors(models, grams, alpha, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.regmean(models, grams, alpha=alpha)


class _Unread:
  """Batches that fail the test if anything reads them."""

  def __iter__(self):
    raise AssertionError("batches were read before the arguments were checked")


@pytest.mark.parametrize("models,batches,alpha,match", [
    ([_mlp_variables(0), _mlp_variables(0, hidden=7)], [_Unread()] * 2, 0.9, "dense_0/bias: \\(6,\\) vs \\(7,\\)"),
    ([_mlp_variables(0)] * 2, [_Unread()] * 2, 2.0, "alpha"),
    ([_mlp_variables(0)] * 2, [_Unread()] * 3, 0.9, "one batches per model \\(2\\)"),
    ([_mlp_variables(0)] * 2, np.ones((2, 4, 5)), 0.9, "one batches per model"),
    ([_mlp_variables(0)] * 2, [np.ones((4, 5))] * 2, 0.9, "batches\\[0\\] is an array"),
    ([_mlp_variables(0)] * 2, [[np.ones((4, 5))], []], 0.9, "batches is empty"),
    ([jax.tree.map(lambda x: x.at[0].set(jnp.inf), _mlp_variables(0))] * 2, [_Unread()] * 2, 0.9,
     "models\\[0\\]: dense_0/bias has 0 NaN and 1 Inf"),
])
def test_regmean_plus_plus_errors_before_reading_data(models, batches, alpha, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.regmean_plus_plus(_mlp, models, batches, alpha=alpha)


def test_plus_plus_names_the_layer_whose_inputs_are_not_finite():
  fn = lambda v, x: jnp.log(x @ v["a"]) @ v["b"]  # log of negatives: NaN inputs for b
  v = {"a": -jnp.ones((3, 2)), "b": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="Grams of model 0: b has"):
    mj.merge.regmean_plus_plus(fn, [v, v], [[np.ones((4, 3), np.float32)]] * 2)


def test_grams_of_a_function_without_kernels_are_refused():
  with pytest.raises(ValueError, match="no linear kernel"):
    mj.merge.regmean_grams(lambda v, x: x * v["s"], {"s": jnp.ones(3)}, [np.ones((2, 3), np.float32)])
