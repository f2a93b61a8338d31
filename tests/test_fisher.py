"""Tests for mergejax.fisher: NumPy references, 1 vs 8 devices, invariances, errors."""

import importlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax import stats
from test_models import SMALL
from test_models import _init

CLASSES = 5
KINDS = ("exact", "empirical", "sampled")


def _softmax_regression(v, x):
  return x @ v["w"] + v["b"]


def _mlp(v, x):
  return jnp.tanh(x @ v["w1"] + v["b1"]) @ v["w2"] + v["b2"]


def _data(n=37, d=4, seed=0):
  rng = np.random.default_rng(seed)
  variables = {"w": rng.standard_normal((d, CLASSES)).astype(np.float32),
               "b": rng.standard_normal(CLASSES).astype(np.float32)}
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  return variables, x, y


def _mlp_variables(seed, d=4, hidden=6):
  rng = np.random.default_rng(seed)
  return {"w1": rng.standard_normal((d, hidden)).astype(np.float32),
          "b1": rng.standard_normal(hidden).astype(np.float32),
          "w2": rng.standard_normal((hidden, CLASSES)).astype(np.float32),
          "b2": rng.standard_normal(CLASSES).astype(np.float32)}


def _batches(x, y, size):
  return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def _numpy_fisher(variables, x, weights):
  """Softmax regression's Fisher: mean_n sum_c weights[n, c] (grad log p_c)^2.

  grad of log p_c w.r.t. W is outer(x, e_c - p), w.r.t. b it is e_c - p.
  """
  w, b = np.asarray(variables["w"], np.float64), np.asarray(variables["b"], np.float64)
  x = np.asarray(x, np.float64)
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  fw, fb = np.zeros_like(w), np.zeros_like(b)
  for n in range(len(x)):
    for c in range(CLASSES):
      e = np.eye(CLASSES)[c] - p[n]
      fw += weights(p)[n, c] * np.outer(x[n], e) ** 2
      fb += weights(p)[n, c] * e ** 2
  return {"w": fw / len(x), "b": fb / len(x)}


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got, want)


def _drawn_labels(logits_fn, variables, x, key):
  """The labels "sampled" draws: example n from fold_in(key, n)."""
  log_p = jax.nn.log_softmax(logits_fn(variables, x))
  keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(len(x)))
  return np.asarray(jax.vmap(jax.random.categorical)(keys, log_p))


@pytest.mark.parametrize("class_chunk", [16, 2])
def test_exact_matches_numpy(class_chunk):
  variables, x, _ = _data()
  got = mj.fisher(_softmax_regression, variables, [x[:16], x[16:32], x[32:]], kind="exact",
                  class_chunk=class_chunk, progress=False)
  _assert_close(got, _numpy_fisher(variables, x, lambda p: p))


def test_empirical_matches_numpy():
  variables, x, y = _data()
  got = mj.fisher(_softmax_regression, variables, _batches(x, y, 16), kind="empirical", progress=False)
  _assert_close(got, _numpy_fisher(variables, x, lambda p: np.eye(CLASSES)[y]))


def test_sampled_is_empirical_on_the_drawn_labels_and_reproducible():
  variables, x, _ = _data()
  key = jax.random.key(3)
  drawn = _drawn_labels(_softmax_regression, variables, x, key)
  batches = [x[:16], x[16:32], x[32:]]
  got = mj.fisher(_softmax_regression, variables, batches, kind="sampled", key=key, progress=False)
  _assert_close(got, _numpy_fisher(variables, x, lambda p: np.eye(CLASSES)[drawn]))
  again = mj.fisher(_softmax_regression, variables, batches, kind="sampled", key=key, progress=False)
  jax.tree.map(np.testing.assert_array_equal, got, again)
  other = mj.fisher(_softmax_regression, variables, batches, kind="sampled", key=jax.random.key(4),
                    progress=False)
  assert not np.allclose(got["w"], other["w"])


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_equals_the_transform_on_one_batch(kind):
  variables, x, y = _data(n=16)
  key = jax.random.key(0)
  whole = mj.fisher(_softmax_regression, variables, [(x, y)], kind=kind, key=key, progress=False)
  batch = jax.jit(mj.fisher_transform(_softmax_regression, kind=kind))(variables, (x, y), key)
  _assert_close(batch, whole)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("example_chunk", [1, 3, 100])
def test_every_example_chunk_gives_the_numpy_fisher(kind, example_chunk):
  """Chunks of 1, of 3 (the last one padded) and of the whole batch."""
  variables, x, y = _data(n=16)
  key = jax.random.key(5)
  labels = {"exact": None, "empirical": y,
            "sampled": _drawn_labels(_softmax_regression, variables, x, key)}[kind]
  weights = (lambda p: p) if labels is None else (lambda p: np.eye(CLASSES)[labels])
  got = jax.jit(mj.fisher_transform(_softmax_regression, kind=kind, example_chunk=example_chunk))(
      variables, (x, y), key)
  _assert_close(got, _numpy_fisher(variables, x, weights))


@pytest.mark.parametrize("kind", KINDS)
def test_one_and_eight_devices_agree(kind):
  variables, x, y = _data()
  key = jax.random.key(1)
  one, eight = (mj.fisher(_softmax_regression, variables, _batches(x, y, 12), kind=kind, key=key,
                          mesh=_mesh(d), progress=False) for d in (1, 8))
  _assert_close(one, eight)


@hypothesis.settings(max_examples=6)
@hypothesis.given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from(KINDS))
def test_ragged_batches_give_the_one_batch_fisher(cuts, kind):
  variables, x, y = _data(n=sum(cuts))
  cuts = sorted(cuts, reverse=True)  # later batches may be smaller than the first
  ends = np.cumsum(cuts)
  parts = [(x[e - c:e], y[e - c:e]) for c, e in zip(cuts, ends)]
  key = jax.random.key(2)
  split = mj.fisher(_softmax_regression, variables, parts, kind=kind, key=key, progress=False)
  whole = mj.fisher(_softmax_regression, variables, [(x, y)], kind=kind, key=key, progress=False)
  _assert_close(split, whole)


def test_update_inside_the_users_shard_map_numbers_examples_globally():
  variables, x, _ = _data(n=32)
  key = jax.random.key(5)
  stat = mj.fisher_accumulator(_softmax_regression, kind="sampled", key=key)
  spec = jax.sharding.PartitionSpec
  update = jax.jit(jax.shard_map(lambda s, v, x, m: stat.update(s, v, x, m, axis_name="data"),
                                 mesh=_mesh(8), in_specs=(spec(), spec(), spec("data"), spec("data")),
                                 out_specs=spec(), check_vma=False))
  state = update(stat.init(variables, x), variables, x, np.ones(32, bool))
  drawn = _drawn_labels(_softmax_regression, variables, x, key)
  _assert_close(stat.finalize(state), _numpy_fisher(variables, x, lambda p: np.eye(CLASSES)[drawn]))


@jax.jit
def _shifted_pair(variables, x, shift):
  plain = mj.fisher_transform(_mlp)(variables, x)
  shifted = mj.fisher_transform(lambda v, x: _mlp(v, x) + shift[:, None])(variables, x)
  return plain, shifted


@hypothesis.given(st.integers(0, 2**31 - 1))
def test_adding_a_constant_to_every_logit_changes_nothing(seed):
  rng = np.random.default_rng(seed)
  variables = _mlp_variables(seed)
  x = rng.standard_normal((8, 4)).astype(np.float32)
  shift = rng.uniform(-20, 20, 8).astype(np.float32)  # one constant per example
  plain, shifted = _shifted_pair(variables, x, shift)
  _assert_close(shifted, plain, rtol=1e-4, atol=1e-5)


def _permuted(variables, hidden, classes):
  return {"w1": variables["w1"][:, hidden], "b1": variables["b1"][hidden],
          "w2": variables["w2"][hidden][:, classes], "b2": variables["b2"][classes]}


@jax.jit
def _empirical_pair(variables, permuted, x, y, permuted_y):
  transform = mj.fisher_transform(_mlp, kind="empirical")
  return transform(variables, (x, y)), transform(permuted, (x, permuted_y))


@hypothesis.given(st.integers(0, 2**31 - 1))
def test_the_fisher_of_a_permuted_model_is_the_permuted_fisher(seed):
  rng = np.random.default_rng(seed)
  variables = _mlp_variables(seed)
  x = rng.standard_normal((8, 4)).astype(np.float32)
  y = rng.integers(0, CLASSES, 8).astype(np.int32)
  hidden, classes = rng.permutation(6), rng.permutation(CLASSES)
  permuted = _permuted(variables, hidden, classes)
  # The permuted model's class c is the original's classes[c]: relabel to match.
  fisher, permuted_fisher = _empirical_pair(variables, permuted, x, y, np.argsort(classes)[y])
  _assert_close(permuted_fisher, _permuted(fisher, hidden, classes), rtol=1e-4, atol=1e-6)


def test_batchnorm_zoo_model_has_finite_fisher_and_zero_for_running_statistics():
  model = models.build("vgg", features=(4, "M", 8), dense=(8,), batch_norm=True, num_classes=CLASSES)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  variables["batch_stats"] = jax.tree.map(  # running statistics away from their init
      lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), variables["batch_stats"])
  logits_fn = lambda v, x: model.apply(v, x, train=False)
  got = mj.fisher(logits_fn, variables, [x[:4], x[4:]], kind="exact", progress=False)
  assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(got["batch_stats"]))
  params = jax.tree.leaves(got["params"])
  assert all(np.all(np.isfinite(leaf)) and leaf.dtype == np.float32 for leaf in params)
  assert all(np.any(leaf > 0) for leaf in params)

  def log_probs(params, example):  # oracle: one example at a time, its full Jacobian
    return jax.nn.log_softmax(logits_fn({**variables, "params": params}, example[None])[0])

  jacobian = jax.jit(jax.jacrev(log_probs))
  want = jax.tree.map(np.zeros_like, variables["params"])
  for example in x:
    p = np.exp(log_probs(variables["params"], example))
    terms = jax.tree.map(lambda j: np.einsum("c,c...->...", p, np.square(j)) / len(x),
                         jacobian(variables["params"], example))
    want = jax.tree.map(np.add, want, terms)
  _assert_close(got["params"], want, rtol=1e-4, atol=1e-7)


def _sequence_model(v, x):  # x: [batch, tokens, d]; the kernel reads several rows per example
  return jnp.mean(jax.nn.relu(x @ v["w"]), axis=1) @ v["head"]


def _tied_model(v, x):  # the same kernel used twice
  return jnp.tanh(jnp.tanh(x @ v["w"]) @ v["w"]) @ v["head"]


def _kernel_read_elsewhere(v, x):  # the head kernel also enters elementwise
  return jnp.tanh(x @ v["w"]) @ v["head"] + jnp.sum(v["head"], axis=0)


def _conv_model(v, x, groups=1):  # x: [batch, 4, 5, 6] (NCHW); strided, padded, dilated
  h = jax.lax.conv_general_dilated(x, v["conv"], (2, 1), ((1, 2), (0, 1)), rhs_dilation=(1, 2),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                   feature_group_count=groups)
  return jnp.mean(jnp.tanh(h), axis=(2, 3)) @ v["head"]


def _grouped_conv_model(v, x):
  return _conv_model(v, x, groups=2)


_MODELS = {  # logits_fn, input shape, variables' shapes
    "sequence": (_sequence_model, (7, 3, 4), {"w": (4, 4), "head": (4, CLASSES)}),
    "tied": (_tied_model, (7, 4), {"w": (4, 4), "head": (4, CLASSES)}),
    "read elsewhere": (_kernel_read_elsewhere, (7, 4), {"w": (4, 4), "head": (4, CLASSES)}),
    "conv": (_conv_model, (7, 4, 5, 6), {"conv": (6, 4, 2, 3), "head": (6, CLASSES)}),
    "grouped conv": (_grouped_conv_model, (7, 4, 5, 6), {"conv": (6, 2, 2, 3), "head": (6, CLASSES)}),
}


@pytest.mark.parametrize("model", list(_MODELS))
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_every_kind_of_kernel_matches_per_example_jacobians(model, kind):
  logits_fn, x_shape, shapes = _MODELS[model]
  rng = np.random.default_rng(1)
  variables = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
  x = rng.standard_normal(x_shape).astype(np.float32)
  y = rng.integers(0, CLASSES, x_shape[0]).astype(np.int32)
  got = jax.jit(mj.fisher_transform(logits_fn, kind=kind, example_chunk=3))(variables, (x, y))

  def log_probs(v, example):
    return jax.nn.log_softmax(logits_fn(v, example[None])[0])

  want = jax.tree.map(np.zeros_like, variables)
  for example, label in zip(x, y):
    p = np.exp(log_probs(variables, example))
    weights = p if kind == "exact" else np.eye(CLASSES)[label]
    jacobian = jax.jacrev(log_probs)(variables, example)
    want = jax.tree.map(lambda w, j: w + np.einsum("c,c...->...", weights, np.square(j)) / len(x),
                        want, jacobian)
  _assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_zoo_models_match_per_example_jacobians(name):
  """Residual convolutions (patch kernels, BatchNorm) and attention (vmapped leaves)."""
  config, input_shape = SMALL[name]
  model = models.build(name, num_classes=CLASSES, **config)
  variables, x = _init(model, input_shape, batch=3)
  logits_fn = lambda v, x: model.apply(v, x, train=False)
  got = jax.jit(mj.fisher_transform(logits_fn, kind="exact", example_chunk=2))(variables, x)

  def log_probs(params, example):
    return jax.nn.log_softmax(logits_fn({**variables, "params": params}, example[None])[0])

  jacobian_fn = jax.jit(jax.jacrev(log_probs))
  want = jax.tree.map(np.zeros_like, variables["params"])
  for example in x:
    p = np.exp(log_probs(variables["params"], example))
    jacobian = jacobian_fn(variables["params"], example)
    want = jax.tree.map(lambda w, j: w + np.einsum("c,c...->...", p, np.square(j)) / len(x),
                        want, jacobian)
  _assert_close(got["params"], want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model, factored", [
    ("sequence", {"head": "outer"}), ("tied", {"head": "outer"}), ("read elsewhere", {"w": "outer"}),
    ("conv", {"conv": "patch", "head": "outer"}), ("grouped conv", {"head": "outer"})])
def test_kernels_that_factorise_are_found(model, factored):
  """Dense kernels on flat inputs and ungrouped convolutions: no per-example gradients."""
  logits_fn, x_shape, shapes = _MODELS[model]
  fisher_module = importlib.import_module("mergejax.fisher")
  found, _ = fisher_module._probed_kernels(
      logits_fn, {n: np.ones(s, np.float32) for n, s in shapes.items()},
      np.ones((1, *x_shape[1:]), np.float32), {(n,): s for n, s in shapes.items()})
  kinds = {fisher_module._OuterKernel: "outer", fisher_module._PatchKernel: "patch"}
  assert {k.path[0]: kinds[type(k)] for k in found} == factored


def test_the_fishers_of_further_models_compile_nothing():
  variables, x, y = _data()
  batches = _batches(x, y, 16)
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  for kind in ("empirical", "sampled"):
    mj.fisher(_softmax_regression, variables, batches, kind=kind, key=jax.random.key(0), progress=False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = jax.tree.map(lambda v: v + 1, variables)
    got = {kind: mj.fisher(_softmax_regression, other, batches, kind=kind, key=jax.random.key(1),
                           progress=False) for kind in ("empirical", "sampled")}
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
  # The reused pass computes the new model's Fisher, with the new key's labels.
  _assert_close(got["empirical"], _numpy_fisher(other, x, lambda p: np.eye(CLASSES)[y]))
  drawn = _drawn_labels(_softmax_regression, other, x, jax.random.key(1))
  _assert_close(got["sampled"], _numpy_fisher(other, x, lambda p: np.eye(CLASSES)[drawn]))


def test_bad_arguments_are_refused_before_any_work():
  variables, x, y = _data(n=8)
  fn = _softmax_regression
  with pytest.raises(ValueError, match="unknown kind 'fishy'"):
    mj.fisher(fn, variables, [x], kind="fishy", progress=False)
  with pytest.raises(ValueError, match="unknown kind"):
    mj.fisher_transform(fn, kind="fishy")
  with pytest.raises(ValueError, match="unknown kind"):
    mj.fisher_accumulator(fn, kind="fishy")
  with pytest.raises(ValueError, match="class_chunk"):
    mj.fisher_transform(fn, class_chunk=0)
  with pytest.raises(ValueError, match="example_chunk must be a positive int"):
    mj.fisher(fn, variables, [x], example_chunk=0, progress=False)
  with pytest.raises(ValueError, match="example_chunk"):
    mj.fisher_accumulator(fn, example_chunk=2.0)
  with pytest.raises(ValueError, match="needs a key"):
    mj.fisher(fn, variables, [x], kind="sampled", progress=False)
  with pytest.raises(ValueError, match="needs a key"):
    mj.fisher_transform(fn, kind="sampled")(variables, x)
  with pytest.raises(ValueError, match="empirical.*labels"):
    mj.fisher(fn, variables, [x], kind="empirical", progress=False)
  with pytest.raises(ValueError, match="empirical.*labels"):
    mj.fisher_transform(fn, kind="empirical")(variables, x)
  with pytest.raises(ValueError, match="empty"):
    mj.fisher(fn, variables, [], progress=False)


@pytest.mark.parametrize("logits_fn, message", [
    (lambda v, x: (x @ v["w"]).sum(-1), r"f32\[batch, classes\].*returned shape \(8,\)"),
    (lambda v, x: (x @ v["w"])[None], r"returned shape \(1, 8, 5\)"),
    (lambda v, x: (x @ v["w"], x @ v["w"]), "one array.*multi-head"),
])
def test_logits_of_the_wrong_shape_are_refused(logits_fn, message):
  variables, x, _ = _data(n=8)
  with pytest.raises(ValueError, match=message):
    mj.fisher(logits_fn, variables, [x], progress=False)
  with pytest.raises(ValueError, match=message):
    mj.fisher_transform(logits_fn)(variables, x)


def test_bad_values_and_labels_are_refused():
  variables, x, y = _data(n=8)
  fn = _softmax_regression
  with pytest.raises(ValueError, match="non-finite logits"):
    mj.fisher(fn, variables, [np.where(np.arange(8)[:, None] == 3, np.inf, x)], progress=False)
  broken = {**variables, "w": variables["w"].copy()}
  broken["w"][0, 0] = np.nan
  with pytest.raises(ValueError, match="fisher: variables: w has 1 NaN"):
    mj.fisher(fn, broken, [x], progress=False)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    mj.fisher(fn, variables, [(x, y + CLASSES)], kind="empirical", progress=False)
  with pytest.raises(ValueError, match="labels must be int"):
    mj.fisher(fn, variables, [(x, y[:5])], kind="empirical", progress=False)
  with pytest.raises(ValueError, match="labels must be int"):
    mj.fisher(fn, variables, [(x, y.astype(np.float32))], kind="empirical", progress=False)
  with pytest.raises(ValueError, match="needs a label"):  # a later batch, caught by accumulate
    mj.fisher(fn, variables, [(x, y), (x[:4], y[:3])], kind="empirical", progress=False)


def test_accumulate_refuses_batches_without_labels_for_a_labelled_statistic():
  variables, x, _ = _data(n=8)
  stat = mj.fisher_accumulator(_softmax_regression, kind="empirical")
  assert stat.labels and not mj.fisher_accumulator(_softmax_regression).labels
  with pytest.raises(ValueError, match=r"reads labels.*batch 0 is a ndarray"):
    stats.accumulate(stat, variables, [x], progress=False)
