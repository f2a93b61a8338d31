"""Tests for mergejax.stats: against NumPy, on 1 and 8 devices, and stable."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import stats


def _features(params, x):
  """Two features per model: a hidden layer, and a [batch, positions, d] map."""
  h = jnp.tanh(x @ params["w"])
  return [h, jnp.stack([h, 2 * h + 1], axis=1)]


def _data(n=37, seed=0):
  rng = np.random.default_rng(seed)
  pa = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
  pb = {"w": rng.standard_normal((4, 5)).astype(np.float32)}
  return pa, pb, rng.standard_normal((n, 4)).astype(np.float32)


def _batches(x, size):
  return [x[i:i + size] for i in range(0, len(x), size)]


def _numpy_cross(fa, fb):
  fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
  ma, mb = fa.mean(0), fb.mean(0)
  ab = (fa - ma).T @ (fb - mb) / len(fa)
  return ma, mb, np.cov(fa.T, bias=True), np.cov(fb.T, bias=True), ab


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("batch", [5, 16])
def test_cross_moments_match_numpy(devices, batch):
  pa, pb, x = _data()
  result = stats.accumulate(stats.cross_moments(_features), (pa, pb), _batches(x, batch),
                            mesh=_mesh(devices), progress=False)
  fa, fb = _features(pa, x), _features(pb, x)
  for r, a, b in zip(result, fa, fb):
    a, b = np.asarray(a).reshape(-1, a.shape[-1]), np.asarray(b).reshape(-1, b.shape[-1])
    ma, mb, aa, bb, ab = _numpy_cross(a, b)
    assert int(r.count) == len(a)
    for got, want in ((r.mean_a, ma), (r.mean_b, mb), (r.cov_aa, aa), (r.cov_bb, bb), (r.cov_ab, ab)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    corr = ab / np.outer(np.sqrt(np.diag(aa)), np.sqrt(np.diag(bb)))
    np.testing.assert_allclose(r.correlation, corr, rtol=1e-4, atol=1e-5)


def test_moments_are_stable_far_from_zero():
  rng = np.random.default_rng(0)
  x = (1e4 + rng.standard_normal((64, 3))).astype(np.float32)
  result = stats.accumulate(stats.moments(lambda v, x: [x]), None, _batches(x, 16), progress=False)
  np.testing.assert_allclose(result[0]["cov"], np.cov(x.astype(np.float64).T, bias=True), rtol=0.05, atol=0.02)
  np.testing.assert_allclose(result[0]["mean"], x.astype(np.float64).mean(0), rtol=1e-6)


@pytest.mark.parametrize("devices", [1, 8])
def test_unit_moments_are_the_diagonal_of_moments_and_stable_far_from_zero(devices):
  pa, _, x = _data()
  result = stats.accumulate(stats.unit_moments(lambda v, x: _features(v, x)), pa, _batches(x, 5),
                            mesh=_mesh(devices), progress=False)
  for r, f in zip(result, _features(pa, x)):
    f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
    assert int(r["count"]) == len(f)
    np.testing.assert_allclose(r["mean"], f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["var"], f.var(0), rtol=1e-4, atol=1e-6)
  far = (1e4 + np.random.default_rng(1).standard_normal((64, 3))).astype(np.float32)
  (r,) = stats.accumulate(stats.unit_moments(lambda v, x: [x]), None, _batches(far, 16), progress=False)
  np.testing.assert_allclose(r["var"], far.astype(np.float64).var(0), rtol=0.05)


@hypothesis.settings(max_examples=8)
@hypothesis.given(st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_any_split_of_the_data_gives_the_same_result(cuts):
  pa, pb, x = _data(n=sum(cuts))
  parts, start = [], 0
  for c in cuts:
    parts.append(x[start:start + c])
    start += c
  parts.sort(key=len, reverse=True)  # later batches may be smaller than the first
  result = stats.accumulate(stats.cross_moments(_features), (pa, pb), parts, progress=False)
  whole = stats.accumulate(stats.cross_moments(_features), (pa, pb), [x], progress=False)
  for r, w in zip(result, whole):
    np.testing.assert_allclose(r.cov_ab, w.cov_ab, rtol=1e-4, atol=1e-5)


def _logits(params, x):
  return jnp.tanh(x @ params["w"]) @ params["head"]


def _accumulator(name):
  """(an Accumulator, its variables) of each kind."""
  pa, pb, _ = _data()
  head = {"head": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
  hidden = lambda params, x: [jnp.tanh(x @ params["w"])]
  return {
      "moments": lambda: (stats.moments(hidden), pa),
      "cross_moments": lambda: (stats.cross_moments(hidden), (pa, pb)),
      "gram": lambda: (stats.gram(hidden, chunk=3), (pa, pb)),
      "fisher": lambda: (mj.fisher_accumulator(_logits, kind="sampled", key=jax.random.key(3)), {**pa, **head}),
  }[name]()


def _users_update(stat, how):
  """`stat.update` inside the user's own `shard_map` or `pmap` over an axis "i" of 8 devices."""
  spec = jax.sharding.PartitionSpec
  if how == "shard_map":
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("i",))
    return jax.jit(jax.shard_map(functools.partial(stat.update, axis_name="i"), mesh=mesh,
                                 in_specs=(spec(), spec(), spec("i"), spec("i")), out_specs=spec(),
                                 check_vma=False))
  mapped = jax.pmap(functools.partial(stat.update, axis_name="i"), axis_name="i", in_axes=(None, None, 0, 0))

  def update(state, variables, x, mask):
    per_device = mapped(state, variables, x.reshape(8, -1, *x.shape[1:]), mask.reshape(8, -1))
    return jax.tree.map(lambda a: a[0], per_device)  # every device holds the same state

  return update


@pytest.mark.parametrize("name", ["moments", "cross_moments", "gram", "fisher"])
def test_update_inside_the_users_pmap_and_shard_map(name):
  stat, variables = _accumulator(name)
  _, _, x = _data(n=64)
  full, holes = x[:32], x[32:]
  mask = np.tile([True, False, True, True], 8)  # padded rows inside every device's rows
  theirs = stats.accumulate(stat, variables, [full, holes[mask]], progress=False)
  for how in ("shard_map", "pmap"):
    update = _users_update(stat, how)
    state = stat.init(variables, full)
    for batch, m in ((full, np.ones(32, bool)), (holes, mask)):
      state = update(state, variables, batch, m)
    for a, b in zip(jax.tree.leaves(stat.finalize(state)), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=how)


def test_one_compilation_for_a_ragged_pass():
  pa, pb, x = _data(n=37)
  traces = []

  def features(params, x):
    traces.append(x.shape)
    return _features(params, x)

  stats.accumulate(stats.cross_moments(features), (pa, pb), [x[:10]], progress=False)
  one_batch = len(traces)
  traces.clear()
  stats.accumulate(stats.cross_moments(features), (pa, pb), _batches(x, 10), progress=False)
  assert len(traces) == one_batch  # four batches, the last ragged: no retrace


def test_bad_batches_are_refused():
  pa, pb, x = _data()
  stat = stats.cross_moments(_features)
  with pytest.raises(ValueError, match="empty"):
    stats.accumulate(stat, (pa, pb), [], progress=False)
  with pytest.raises(ValueError, match="at most the first"):
    stats.accumulate(stat, (pa, pb), [x[:4], x[:8]], progress=False)
  with pytest.raises(ValueError, match="same input shape"):
    stats.accumulate(stat, (pa, pb), [x[:4], x[:4, :3]], progress=False)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("chunk", [None, 3])
def test_gram_matches_a_numpy_loop(devices, chunk):
  pa, pb, x = _data()
  result = stats.accumulate(stats.gram(_features, chunk=chunk), (pa, pb), _batches(x, 16),
                            mesh=_mesh(devices), progress=False)
  for k, r in enumerate(result):
    want = np.zeros((r.gram.shape[0],) * 2)
    rows = 0
    for i in range(len(x)):  # one example at a time, in float64
      fa, fb = (np.asarray(_features(p, x[i:i + 1])[k], np.float64) for p in (pa, pb))
      z = np.concatenate([fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])], axis=1)
      want += z.T @ z
      rows += len(z)
    assert r.sizes == (3, 5)
    assert int(r.count) == rows
    np.testing.assert_allclose(r.gram, want, rtol=1e-5, atol=1e-4)


def _wide_and_narrow(params, x):
  """A map of many positions per example (streamed through the chunks) and one of a single position (kept
  for the whole batch): f32[batch, 256, 3] and f32[batch, 3]."""
  h = jnp.tanh(x @ params["w"])
  positions = jnp.linspace(-1.0, 1.0, stats._STREAMED_ROWS // 2)
  return [jnp.sin(h[:, None, :] * positions[:, None] + positions[:, None]), h]


def test_chunked_gram_streams_many_rows_and_keeps_few_for_the_whole_batch():
  pa, _, x = _data(n=11)
  chunk = 2  # 2 x 256 rows a chunk: the map is streamed; the 2 rows of h are not
  assert chunk * stats._STREAMED_ROWS // 2 >= stats._STREAMED_ROWS > chunk
  pb = {"w": pa["w"][:, ::-1] * 0.5}
  result = stats.accumulate(stats.gram(_wide_and_narrow, chunk=chunk), (pa, pb), _batches(x, 5), mesh=_mesh(1),
                            progress=False)
  for got, fa, fb in zip(result, _wide_and_narrow(pa, x), _wide_and_narrow(pb, x)):
    z = np.concatenate([np.asarray(f, np.float64).reshape(-1, 3) for f in (fa, fb)], axis=1)
    assert int(got.count) == len(z)
    np.testing.assert_allclose(got.gram, z.T @ z, rtol=1e-5, atol=1e-3)


def _scaled(params, x, scale):
  return [scale * jnp.tanh(x @ params["w"])]


def backend_compiles(fn, *args, **kwargs):
  """(fn(*args, **kwargs), the number of XLA compilations it ran)."""
  compiles = []
  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    return fn(*args, **kwargs), len(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_by_value_functions_share_one_compiled_pass():
  by_value = lambda scale: stats.ByValue(functools.partial(_scaled, scale=scale))
  assert by_value(2.0) == by_value(2.0) and hash(by_value(2.0)) == hash(by_value(2.0))
  assert by_value(2.0) != by_value(3.0)
  array = jnp.ones(2)  # unhashable arguments: compared by identity
  with_array = lambda: stats.ByValue(functools.partial(_scaled, scale=array))
  assert with_array() != with_array()
  vgg = lambda: mj.models.build("vgg", features=(3,), dense=(), num_classes=2)
  assert stats.ByValue(vgg().apply) == stats.ByValue(vgg().apply)  # equal Flax modules' bound methods
  assert stats.ByValue(functools.partial(vgg().apply, mutable=["batch_stats"])) == stats.ByValue(
      functools.partial(vgg().apply, mutable=["batch_stats"]))
  pa, pb, x = _data(n=12)
  run = lambda scale: stats.accumulate(stats.gram(by_value(scale), chunk=3), (pa, pb), _batches(x, 6),
                                       progress=False)
  first, compiles = backend_compiles(run, 2.0)
  assert compiles >= 1
  second, compiles = backend_compiles(run, 2.0)
  assert compiles == 0
  np.testing.assert_array_equal(first[0].gram, second[0].gram)
  third, compiles = backend_compiles(run, 3.0)
  assert compiles >= 1
  np.testing.assert_allclose(third[0].gram, 2.25 * np.asarray(first[0].gram), rtol=1e-5)
