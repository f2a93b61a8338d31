"""Tests for mergejax.merge.twin: exact reconstruction at full rank, the truncated SVD against
NumPy, one-hot routing, per-input apply against a NumPy loop, router training, and errors."""

import jax
import numpy as np
import pytest

import mergejax as mj


def mlp(variables, x):
  """A two-layer MLP in plain jnp: x f32[n, 4] -> logits f32[n, 3]."""
  p = variables["params"]
  h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]


def mlp_np(p, x):
  h = np.maximum(x @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0)
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]


MLP_SHAPES = {"dense0": {"kernel": (4, 8), "bias": (8,)}, "dense1": {"kernel": (8, 3), "bias": (3,)}}


def mlp_params(rng, scale, like=None):
  """`mlp`'s variables: scale * standard normal leaves from rng, added to `like`'s when given."""
  noise = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32) * scale, MLP_SHAPES,
                       is_leaf=lambda s: isinstance(s, tuple))
  return {"params": noise if like is None else jax.tree.map(np.add, like["params"], noise)}


@pytest.fixture(scope="module")
def setting():
  """(base, [3 tuned models], shared = their task arithmetic, inputs f32[6, 4])."""
  rng = np.random.default_rng(0)
  base = mlp_params(rng, 1.0)
  tuned = [mlp_params(rng, 0.5, base) for _ in range(3)]
  shared = mj.merge.task_arithmetic(base, tuned, scale=0.4)
  return base, tuned, shared, rng.normal(size=(6, 4)).astype(np.float32)


def _np_variables(shared, tuned, weights, rank):
  """shared + sum_t w_t [rank-r SVD of the kernels' differences | whole bias differences], in NumPy."""
  out = {}
  for layer in ("dense0", "dense1"):
    s = {k: np.asarray(v, np.float64) for k, v in shared["params"][layer].items()}
    kernel, bias = s["kernel"].copy(), s["bias"].copy()
    for w, m in zip(weights, tuned):
      u, sv, vt = np.linalg.svd(np.asarray(m["params"][layer]["kernel"], np.float64) - s["kernel"])
      kernel += w * (u[:, :rank] * sv[:rank]) @ vt[:rank]
      bias += w * (np.asarray(m["params"][layer]["bias"], np.float64) - s["bias"])
    out[layer] = {"kernel": kernel, "bias": bias}
  return out


def test_full_rank_one_hot_reproduces_each_task_model(setting):
  _, tuned, shared, _ = setting
  parts = mj.merge.twin_parts(shared, tuned, rank=8)  # >= min(in, out) of every kernel
  for t, model in enumerate(tuned):
    got = mj.merge.twin_variables(parts, np.eye(3, dtype=np.float32)[t])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, model)


def test_truncated_parts_and_mixture_match_numpy(setting):
  _, tuned, shared, _ = setting
  parts = mj.merge.twin_parts(shared, tuned, rank=2)
  assert parts.exclusive["params"]["dense0"]["kernel"].down.shape == (3, 4, 2)
  assert parts.exclusive["params"]["dense1"]["kernel"].up.shape == (3, 2, 3)
  weights = np.array([0.2, 0.5, 0.3], np.float32)
  got = mj.merge.twin_variables(parts, weights)["params"]
  want = _np_variables(shared, tuned, weights, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got, want)


def test_one_hot_router_gives_shared_plus_that_tasks_part(setting):
  """A router whose last bias favours task 1 by 1e4: its softmax is one-hot, so twin_apply is that model."""
  _, tuned, shared, x = setting
  parts = mj.merge.twin_parts(shared, tuned, rank=2)
  router = mj.merge.twin_router_init(jax.random.key(0), 4, 3)
  router["layers"][-1]["w"] = router["layers"][-1]["w"] * 0
  router["layers"][-1]["b"] = np.array([0.0, 1e4, 0.0], np.float32)
  logits = np.asarray(mj.merge.twin_router(router, x), np.float64)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_array_equal(weights, np.tile([0.0, 1.0, 0.0], (6, 1)))
  got = mj.merge.twin_apply(mlp, parts, weights, x, chunk=4)
  want = mlp_np(_np_variables(shared, tuned, [0, 1, 0], 2), x.astype(np.float64))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_per_input_apply_equals_numpy_loop(setting):
  _, tuned, shared, x = setting
  parts = mj.merge.twin_parts(shared, tuned, rank=2)
  weights = np.random.default_rng(1).dirichlet(np.ones(3), size=6).astype(np.float32)
  got = mj.merge.twin_apply(mlp, parts, weights, x, chunk=4)  # 6 = one full block and a padded one
  want = np.stack([mlp_np(_np_variables(shared, tuned, w, 2), x[i:i + 1].astype(np.float64))[0]
                   for i, w in enumerate(weights)])
  np.testing.assert_allclose(got, want, atol=1e-4)
  # The inputs really get different models: the shared model alone differs.
  assert np.abs(got - mlp_np(jax.tree.map(np.asarray, shared["params"]), x)).max() > 1e-2


def test_router_learns_separable_tasks():
  """Three Gaussian blobs, one per task: the trained router classifies them, and training lowers the loss."""
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(3, 5)) * 4
  labels = np.repeat(np.arange(3), 20)
  features = (centres[labels] + rng.normal(size=(60, 5))).astype(np.float32)
  untrained = mj.merge.twin_router_train(features, labels, 3, key=jax.random.key(0), steps=0)
  router = mj.merge.twin_router_train(features, labels, 3, key=jax.random.key(0), steps=200, learning_rate=1e-2)

  def loss(r):
    z = np.asarray(mj.merge.twin_router(r, features), np.float64)
    logp = z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(-1, keepdims=True)
    return -float(np.mean(logp[np.arange(60), labels]))

  assert loss(router) < 0.1 * loss(untrained)
  assert np.mean(np.argmax(mj.merge.twin_router(router, features), -1) == labels) == 1.0
  np.testing.assert_allclose(router["mean"], features.mean(0), rtol=1e-5, atol=1e-5)


def test_errors(setting):
  base, tuned, shared, x = setting
  parts = mj.merge.twin_parts(shared, tuned, rank=2)
  with pytest.raises(ValueError, match="rank must be an integer >= 1"):
    mj.merge.twin_parts(shared, tuned, rank=0)
  with pytest.raises(ValueError, match="models: need at least one"):
    mj.merge.twin_parts(shared, [], rank=2)
  bad = {"params": {**tuned[0]["params"], "dense1": {"kernel": np.zeros((8, 4)), "bias": np.zeros(3)}}}
  with pytest.raises(ValueError, match=r"models\[1\] does not match.*dense1"):
    mj.merge.twin_parts(shared, [tuned[0], bad], rank=2)
  with pytest.raises(ValueError, match=r"weights must be finite f32\[3\]"):
    mj.merge.twin_variables(parts, np.ones(2))
  with pytest.raises(ValueError, match="parts must be a TwinParts"):
    mj.merge.twin_variables(shared, np.ones(3))
  with pytest.raises(ValueError, match=r"weights must be finite f32\[n, 3\]"):
    mj.merge.twin_apply(mlp, parts, np.full((6, 3), np.nan), x)
  with pytest.raises(ValueError, match="needs the 5 examples"):
    mj.merge.twin_apply(mlp, parts, np.ones((5, 3)) / 3, x)
  with pytest.raises(ValueError, match="chunk must be"):
    mj.merge.twin_apply(mlp, parts, np.ones((6, 3)) / 3, x, chunk=0)
  with pytest.raises(ValueError, match=r"labels must be tasks in \[0, 3\)"):
    mj.merge.twin_router_train(x, np.array([0, 1, 2, 3, 0, 1]), 3, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"labels must be int\[6\]"):
    mj.merge.twin_router_train(x, np.zeros(5, int), 3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="features must be finite"):
    mj.merge.twin_router_train(x[0], np.zeros(4, int), 3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="learning_rate must be finite"):
    mj.merge.twin_router_train(x, np.zeros(6, int), 3, key=jax.random.key(0), learning_rate=0.0)
