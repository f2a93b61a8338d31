"""Tests for mergejax.merge.adamerging and mergejax.merge.concrete: AdaMerging's
coefficients and Concrete masks against NumPy references, closed-form optima,
identities, a single compilation, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax.merge.adamerging import _draw
from mergejax.merge.adamerging import _leaf_groups
from mergejax.merge.adamerging import entropy_loss as _entropy_loss
from tests.test_task_vectors import _leaves
from tests.test_task_vectors import _unflatten

entropy_loss = jax.jit(_entropy_loss, static_argnums=0)


def mlp(variables, x):
  """A two-layer MLP in plain jnp: x f32[n, 4] -> logits f32[n, 3]."""
  p = variables["params"]
  h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]


@pytest.fixture(scope="module")
def setting():
  """(base, [2 tuned models], [2 input sets of 16 examples])."""
  rng = np.random.default_rng(0)

  def params(scale, like=None):
    shapes = {"dense0": {"kernel": (4, 8), "bias": (8,)}, "dense1": {"kernel": (8, 3), "bias": (3,)}}
    noise = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32) * scale, shapes,
                         is_leaf=lambda s: isinstance(s, tuple))
    return {"params": noise if like is None else jax.tree.map(np.add, like["params"], noise)}

  base = params(1.0)
  tuned = [params(0.7, base), params(0.7, base)]
  inputs = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(2)]
  return base, tuned, inputs


def reference_merge(base, models, coefficients, groups, mask=None):
  """base + mask/mean(mask) * sum_t coefficients[t, g_j] (models[t] - base), leaf j, in float64."""
  taus = [[x - b for (_, b), (_, x) in zip(_leaves(base), _leaves(m))] for m in models]
  masks = [None] * len(groups) if mask is None else [m for _, m in _leaves(mask)]
  merged = []
  for j, ((_, b), g, m) in enumerate(zip(_leaves(base), groups, masks)):
    delta = sum(np.float64(coefficients[t][g]) * taus[t][j].astype(np.float64) for t in range(len(models)))
    if m is not None:
      delta = m / m.mean() * delta
    merged.append(b.astype(np.float64) + delta)
  return _unflatten(base, merged)


def assert_close(a, b, **tol):
  for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=path, **tol)


def test_prediction_entropy_matches_numpy():
  logits = np.random.default_rng(1).normal(size=(2, 5, 7)) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.mean(-np.sum(p * np.log(p), axis=-1))
  np.testing.assert_allclose(mj.merge.prediction_entropy(logits), expected, rtol=1e-5)
  assert float(mj.merge.prediction_entropy(np.zeros((3, 4)))) == pytest.approx(np.log(4))


def test_entropy_loss_sums_each_input_sets_mean_entropy_over_its_classes():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 5)).astype(np.float32)
  apply_fn = lambda v, x: x[:, :3] @ v  # reads the first 3 features of any width

  def numpy_entropy(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.mean(-np.sum(p * np.log(p), axis=-1))

  # Sets of one width run as one batch (classes by masking), of two widths one by one (by gathering).
  for widths in ((4, 4, 4), (4, 6, 3)):
    sets = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip((5, 2, 7), widths)]
    classes = [(0, 1), (1, 3, 4), (2,)]
    expected = sum(numpy_entropy((x[:, :3] @ w)[:, list(c)]) for x, c in zip(sets, classes))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda v, c: _entropy_loss(apply_fn, v, sets, c)))
    got, grads = loss_and_grad(w, tuple(jnp.asarray(c) for c in classes))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=str(widths))
    assert np.all(np.isfinite(grads)) and np.all(grads[:, 0] != 0)  # column 0 is in task 0's classes


def test_no_steps_is_task_arithmetic_at_the_initial_coefficients(setting):
  base, tuned, inputs = setting
  merged, lam = mj.merge.adamerging(mlp, base, tuned, inputs, steps=0, init=(0.2, 0.5))
  np.testing.assert_array_equal(lam, np.float32([0.2, 0.5]))
  expected = mj.merge.task_arithmetic(base, tuned, scale=(0.2, 0.5))
  for (path, x), (_, y) in zip(_leaves(merged), _leaves(expected)):
    np.testing.assert_array_equal(x, y, err_msg=path)


def line_model():
  """A linear softmax model whose entropy along base + lambda tau has an interior minimum.

  Example 1 starts uniform over 5 classes and tau makes it confident in class 0;
  example 2 starts confident in class 0 and tau ties classes 1-4 above it, so
  a large lambda costs it log 4 nats.
  """
  w0 = np.zeros((2, 5), np.float32)
  w0[1, 0] = 6
  tau = np.zeros((2, 5), np.float32)
  tau[0, 0], tau[1, 1:] = 2, 1
  x = np.eye(2, dtype=np.float32)

  def entropy(lam):  # f64[K] of lambdas -> the mean entropy at each
    z = w0[None] + lam[:, None, None] * tau[None]
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -np.mean(np.sum(np.exp(log_p) * log_p, axis=-1), axis=-1)

  return {"w": w0}, {"w": w0 + tau}, x, entropy


def linear(variables, x):
  return x @ variables["w"]


def test_one_task_vector_reaches_the_entropy_minimum_on_its_line():
  base, tuned, x, entropy = line_model()
  grid = np.linspace(0, 5, 50001)
  best = grid[np.argmin(entropy(grid))]
  assert 1 < best < 4  # interior: neither the base nor far along tau
  merged, lam = mj.merge.adamerging(linear, base, [tuned], [x], steps=200,
                                    learning_rate=2.0, optimizer=optax.sgd)
  assert lam.shape == (1,)
  assert float(lam[0]) == pytest.approx(best, abs=2e-4)
  np.testing.assert_allclose(merged["w"], base["w"] + lam[0] * (tuned["w"] - base["w"]), rtol=1e-6)
  # Clipped to [0, 1], the coefficient stops at the bound nearest the minimum.
  _, clipped = mj.merge.adamerging(linear, base, [tuned], [x], steps=50,
                                   learning_rate=2.0, optimizer=optax.sgd, clip=True)
  assert float(clipped[0]) == 1.0


def test_layer_wise_lowers_the_entropy_and_merges_by_block(setting):
  base, tuned, inputs = setting
  blocks = mj.merge.blocks_in_read_order(mlp, base, inputs[0][:1])
  assert sorted(set(blocks.values())) == [0, 1]
  classes = [(0, 1), (1, 2)]
  merged, lam = mj.merge.adamerging(mlp, base, tuned, inputs, granularity="layer", blocks=blocks,
                                    steps=30, learning_rate=0.05, classes=classes)
  assert lam.shape == (2, 2)
  groups = [blocks[path] for path, _ in _leaves(base)]
  assert_close(merged, reference_merge(base, tuned, np.asarray(lam), groups), rtol=1e-5, atol=1e-6)
  init = mj.merge.task_arithmetic(base, tuned, scale=0.3)
  columns = tuple(jnp.asarray(c) for c in classes)
  assert entropy_loss(mlp, merged, inputs, columns) < entropy_loss(mlp, init, inputs, columns) - 0.05
  assert not np.allclose(lam[:, 0], lam[:, 1])  # the two blocks learn their own coefficients


def test_layer_wise_with_every_leaf_in_one_block_is_task_wise(setting):
  base, tuned, inputs = setting
  merged, lam = mj.merge.adamerging(mlp, base, tuned, inputs, steps=10, learning_rate=0.05)
  tied, tied_lam = mj.merge.adamerging(mlp, base, tuned, inputs, granularity="layer",
                                       blocks=lambda path: 0, steps=10, learning_rate=0.05)
  assert lam.shape == (2,) and tied_lam.shape == (2, 1)
  np.testing.assert_allclose(tied_lam[:, 0], lam, rtol=1e-6)
  assert_close(tied, merged, rtol=1e-6, atol=1e-7)
  assert not np.allclose(lam, 0.3)


def test_layer_wise_columns_without_blocks_and_for_leaves_outside_them(setting):
  base, tuned, inputs = setting
  paths = [path for path, _ in _leaves(base)]
  merged, per_leaf = mj.merge.adamerging(mlp, base, tuned, inputs, granularity="layer", steps=3,
                                         learning_rate=0.05)
  assert per_leaf.shape == (2, len(paths))  # one coefficient per leaf (FusionBench's per tensor)
  assert_close(merged, reference_merge(base, tuned, np.asarray(per_leaf), range(len(paths))),
               rtol=1e-5, atol=1e-6)
  # Leaves whose block is None share one more column, the last.
  blocks = {p: (None if "bias" in p else 2 * ("dense1" in p)) for p in paths}
  groups, columns = _leaf_groups(base, "layer", blocks)
  assert columns == 4 and list(groups) == [3 if blocks[p] is None else blocks[p] for p in paths]
  assert _leaf_groups(base, "task", None) == ((0,) * len(paths), 1)


def test_batches_of_every_example_are_the_full_batch_and_a_key_fixes_the_draws(setting):
  base, tuned, inputs = setting
  _, full = mj.merge.adamerging(mlp, base, tuned, inputs, steps=5, learning_rate=0.05)
  _, every = mj.merge.adamerging(mlp, base, tuned, inputs, steps=5, learning_rate=0.05,
                                 batch_size=16, key=jax.random.key(3))
  np.testing.assert_allclose(every, full, rtol=1e-5)  # each step sees all 16 examples, in some order
  sets = [np.arange(16), np.arange(100, 116)]
  jitted = jax.jit(_draw, static_argnums=2)
  draw = lambda seed: [np.asarray(b) for b in jitted(sets, jax.random.key(seed), 4)]
  a, b, c = draw(0), draw(0), draw(1)
  for t, x in enumerate(sets):
    assert len(set(a[t])) == 4 and set(a[t]) <= set(x)  # without replacement, from its own set
    np.testing.assert_array_equal(a[t], b[t])
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_the_optimisation_compiles_once_for_new_steps_rates_and_inits(setting):
  base, tuned, inputs = setting
  traces = []

  def counted(variables, x):
    traces.append(1)
    return mlp(variables, x)

  mj.merge.adamerging(counted, base, tuned, inputs, steps=2, learning_rate=0.01)
  first = len(traces)
  assert first > 0
  mj.merge.adamerging(counted, base, tuned, inputs, steps=7, learning_rate=0.03, init=(0.1, 0.4), clip=True)
  mj.merge.adamerging(counted, base, tuned, inputs, steps=0, learning_rate=1.0)
  assert len(traces) == first  # nothing traced again, so nothing compiled again


def test_concrete_mask_is_in_the_unit_interval_and_hardens_as_the_temperature_falls():
  key = jax.random.key(5)
  logits = {"a": np.full((100, 100), 1.0, np.float32), "b": np.linspace(-3, 3, 7, dtype=np.float32)}
  soft = mj.merge.concrete_mask(logits, key, temperature=0.5)
  for (path, m), (_, l) in zip(_leaves(soft), _leaves(logits)):
    assert m.shape == l.shape and m.min() >= 0 and m.max() <= 1, path
  # The sample's formula, with one draw of logistic noise cut into the leaves in flattening order.
  sizes = [l.size for _, l in _leaves(logits)]
  draw = np.asarray(jax.random.logistic(key, (sum(sizes),)))
  noise = [g.reshape(np.shape(l)) for g, (_, l) in zip(np.split(draw, np.cumsum(sizes)[:-1]), _leaves(logits))]
  for (path, m), (_, l), g in zip(_leaves(soft), _leaves(logits), noise):
    np.testing.assert_allclose(m, 1 / (1 + np.exp(-(l + g) / 0.5)), rtol=1e-5, atol=1e-6, err_msg=path)
  hard = mj.merge.concrete_mask(logits, key, hard=True)
  cold = mj.merge.concrete_mask(logits, key, temperature=1e-4)
  for (path, h), (_, c), (_, l), g in zip(_leaves(hard), _leaves(cold), _leaves(logits), noise):
    assert set(np.unique(h)) <= {0.0, 1.0}
    np.testing.assert_array_equal(h, (l + g > 0).astype(np.float32), err_msg=path)
    clear = np.abs(l + g) > 1e-2  # away from the threshold the cold sample is the hard one
    np.testing.assert_allclose(c[clear], h[clear], atol=1e-6, err_msg=path)
  # The hard mask keeps an entry with probability sigmoid(l): 10^4 draws at l = 1.
  assert float(hard["a"].mean()) == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.015)


def test_concrete_task_arithmetic_merges_with_the_rescaled_mask_and_lowers_the_entropy(setting):
  base, tuned, inputs = setting
  key = jax.random.key(6)
  start, start_mask = mj.merge.concrete_task_arithmetic(mlp, base, tuned, inputs, key=key, steps=0)
  groups = [0] * len(_leaves(base))
  assert_close(start, reference_merge(base, tuned, [[0.3], [0.3]], groups, start_mask), rtol=1e-5, atol=1e-6)
  merged, mask = mj.merge.concrete_task_arithmetic(mlp, base, tuned, inputs, key=key, steps=40,
                                                   learning_rate=0.1, scale=(0.5, 0.7))
  assert_close(merged, reference_merge(base, tuned, [[0.5], [0.7]], groups, mask), rtol=1e-5, atol=1e-6)
  for path, m in _leaves(mask):
    assert m.min() >= 0 and m.max() <= 1, path
  # Against the mask the same final draw gives from the initial logits: lower entropy.
  untrained, _ = mj.merge.concrete_task_arithmetic(mlp, base, tuned, inputs, key=key, steps=0,
                                                   scale=(0.5, 0.7))
  assert entropy_loss(mlp, merged, inputs) < entropy_loss(mlp, untrained, inputs) - 0.05
  _, hard = mj.merge.concrete_task_arithmetic(mlp, base, tuned, inputs, key=key, steps=0,
                                              final_mask="discrete")
  for (path, h), (_, s) in zip(_leaves(hard), _leaves(start_mask)):
    np.testing.assert_array_equal(h, (s > 0.5).astype(np.float32), err_msg=path)  # same draw, hardened


def test_concrete_adamerging_with_a_mask_of_ones_is_adamerging(setting):
  base, tuned, inputs = setting
  key = jax.random.key(7)
  options = dict(steps=8, learning_rate=0.05)
  expected, expected_lam = mj.merge.adamerging(mlp, base, tuned, inputs, **options)
  # Logits of 40 keep every entry (the logistic noise would have to fall below -40).
  merged, lam, mask = mj.merge.concrete_adamerging(mlp, base, tuned, inputs, key=key, mask_steps=3,
                                                   init_logits=40.0, final_mask="discrete", **options)
  assert all(np.all(m == 1) for _, m in _leaves(mask))
  np.testing.assert_allclose(lam, expected_lam, rtol=1e-6)
  assert_close(merged, expected, rtol=1e-6, atol=1e-7)


def test_concrete_adamerging_learns_a_mask_and_coefficients_under_it(setting):
  base, tuned, inputs = setting
  key = jax.random.key(8)
  merged, lam, mask = mj.merge.concrete_adamerging(
      mlp, base, tuned, inputs, key=key, mask_steps=20, mask_learning_rate=0.1, steps=20,
      learning_rate=0.05)
  assert lam.shape == (2,)
  groups = [0] * len(_leaves(base))
  assert_close(merged, reference_merge(base, tuned, np.asarray(lam)[:, None], groups, mask),
               rtol=1e-5, atol=1e-6)
  init = mj.merge.task_arithmetic(base, tuned, scale=0.3)
  assert entropy_loss(mlp, merged, inputs) < entropy_loss(mlp, init, inputs)
  _, untrained_mask = mj.merge.concrete_task_arithmetic(mlp, base, tuned, inputs, key=key, steps=0)
  assert not all(np.allclose(m, u) for (_, m), (_, u) in zip(_leaves(mask), _leaves(untrained_mask)))


def _renamed(tree):
  return {"params": {**tree["params"], "dense9": tree["params"].pop("dense1")}}


@pytest.mark.parametrize("change, message", [
    (dict(models="renamed"), r"models\[0\] does not match the base: params/dense9/bias: in tree 1"),
    (dict(models=[]), "need at least one model"),
    (dict(inputs=[]), "inputs: need a non-empty sequence"),
    (dict(inputs="array"), "inputs: need a non-empty sequence"),
    (dict(inputs=[np.zeros((0, 4), np.float32)]), r"inputs\[0\]: no examples"),
    (dict(inputs=[{"a": np.zeros((3, 4)), "b": np.zeros((2, 4))}]), r"inputs\[0\]: every array needs"),
    (dict(granularity="layerwise"), "granularity must be one of"),
    (dict(blocks={}), "pass granularity='layer'"),
    (dict(granularity="layer", blocks={"params/dense0/kernel": 0}), "no block for leaf"),
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(steps=2.5), "steps must be an integer >= 0"),
    (dict(learning_rate=0.0), "learning_rate must be finite and > 0"),
    (dict(init=(0.3, 0.3, 0.3)), "init: 2 models but 3 initial coefficients"),
    (dict(init=float("nan")), "init must be finite"),
    (dict(batch_size=17, key=jax.random.key(0)), r"batch_size 17 > 16, the examples of inputs\[0\]"),
    (dict(batch_size=4), "pass a key"),
    (dict(classes=[(0,)]), "classes: 2 input sets"),
    (dict(classes=[(0, 3), (1,)]), r"classes\[0\] must be a non-empty list of logit columns in \[0, 3\)"),
    (dict(apply_fn=lambda v, x: (mlp(v, x), x)), "must return one array of logits"),
    (dict(optimizer="adam"), "optimizer must be a callable"),
])
def test_adamerging_errors(setting, change, message):
  base, tuned, inputs = setting
  args = dict(apply_fn=mlp, models=tuned, inputs=inputs)
  args.update(change)
  if args["models"] == "renamed":
    args["models"] = [_renamed(jax.tree.map(np.copy, tuned[0]))]
  if isinstance(args["inputs"], str):
    args["inputs"] = inputs[0]
  apply_fn, models, data = args.pop("apply_fn"), args.pop("models"), args.pop("inputs")
  with pytest.raises(ValueError, match=message):
    mj.merge.adamerging(apply_fn, base, models, data, steps=args.pop("steps", 1), **args)


@pytest.mark.parametrize("fn, change, message", [
    ("task_arithmetic", dict(key=None), "pass a key"),
    ("task_arithmetic", dict(temperature=0.0), "temperature must be finite and > 0"),
    ("task_arithmetic", dict(final_mask="hard"), "final_mask must be one of"),
    ("task_arithmetic", dict(init_logits=float("inf")), "init_logits must be finite"),
    ("task_arithmetic", dict(scale=(0.1,)), "scale: 2 models but 1 scales"),
    ("adamerging", dict(mask_steps=-2), "mask_steps must be an integer >= 0"),
    ("adamerging", dict(inner_learning_rate=-1.0), "inner_learning_rate must be finite and > 0"),
    ("adamerging", dict(granularity="tasks"), "granularity must be one of"),
    ("adamerging", dict(inputs=[]), "inputs: need a non-empty sequence"),
])
def test_concrete_errors(setting, fn, change, message):
  base, tuned, inputs = setting
  args = dict(key=jax.random.key(0), inputs=inputs)
  args.update(change)
  data = args.pop("inputs")
  merge = getattr(mj.merge, f"concrete_{fn}")
  with pytest.raises(ValueError, match=message):
    merge(mlp, base, tuned, data, **args)
  with pytest.raises(ValueError, match="temperature must be finite and > 0"):
    mj.merge.concrete_mask({"a": np.zeros(3)}, jax.random.key(0), temperature=-1.0)
