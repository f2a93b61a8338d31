"""Tests for mergejax.repair: batch-norm reset and REPAIR against NumPy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import models
from mergejax import repair
from mergejax import trace
from mergejax import tree
from test_models import _init
from tests.test_stats import backend_compiles


def test_reset_batch_norm_gives_the_statistics_of_all_the_data():
  model = models.build("vgg", features=(3,), dense=(), num_classes=2)
  variables, _ = _init(model, (4, 4, 2))
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((n, 4, 4, 2)).astype(np.float32) + 2 for n in (8, 8, 5)]

  def train_apply(v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"])

  reset = repair.reset_batch_norm(train_apply, variables, batches)
  x = np.concatenate(batches)
  kernel = np.asarray(variables["params"]["conv_0"]["kernel"])
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = np.asarray(conv, np.float64).reshape(-1, 3)
  np.testing.assert_allclose(reset["batch_stats"]["bn_0"]["mean"], conv.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(reset["batch_stats"]["bn_0"]["var"], conv.var(0), rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(reset) == jax.tree.structure(variables)
  with pytest.raises(ValueError, match="no batch_stats"):
    repair.reset_batch_norm(train_apply, {"params": variables["params"]}, batches)


def test_reset_batch_norm_compiles_once_per_architecture():
  config = dict(features=(3, "M", 4), dense=(), num_classes=2)
  build = lambda **c: functools.partial(models.build("vgg", **c).apply, train=True, mutable=["batch_stats"])
  variables, _ = _init(models.build("vgg", **config), (4, 4, 2))
  batches = [np.random.default_rng(1).standard_normal((6, 4, 4, 2)).astype(np.float32)] * 2
  first, compiles = backend_compiles(repair.reset_batch_norm, build(**config), variables, batches)
  assert compiles >= 1
  other = jax.tree.map(lambda a: a * 1.5, variables)  # a rebuilt model of the same layout: nothing compiles
  second, compiles = backend_compiles(repair.reset_batch_norm, build(**config), other, batches)
  assert compiles == 0
  assert not np.allclose(first["batch_stats"]["bn_0"]["var"], second["batch_stats"]["bn_0"]["var"])
  wider = dict(config, features=(5, "M", 4))
  _, compiles = backend_compiles(repair.reset_batch_norm, build(**wider),
                                  _init(models.build("vgg", **wider), (4, 4, 2))[0], batches)
  assert compiles >= 1


def _unit_moments(model, variables, x, layer):
  _, uses = trace.kernel_uses(model.apply)(variables, x)
  p = variables["params"][layer]
  y = np.asarray(uses[("params", layer, "kernel")][0].output) + np.asarray(p["bias"])
  return y.mean(0), y.std(0)


def test_repair_restores_interpolated_unit_statistics():
  model = models.build("mlp", features=(6, 5), num_classes=3)
  va, x = _init(model, (4,), batch=64, seed=0)
  vb, _ = _init(model, (4,), batch=64, seed=1)
  spec = trace.permutation_spec(model.apply, va, x)
  merged = tree.lerp(va, vb, 0.3)
  fixed = repair.repair(spec, model.apply, va, vb, merged, [x], t=0.3)
  for layer in ("hidden_0", "hidden_1"):
    ma, sa = _unit_moments(model, va, x, layer)
    mb, sb = _unit_moments(model, vb, x, layer)
    m, s = _unit_moments(model, fixed, x, layer)
    np.testing.assert_allclose(m, 0.7 * ma + 0.3 * mb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(s, 0.7 * sa + 0.3 * sb, rtol=1e-3, atol=1e-3)
  # The head is an output, not a group: left alone.
  np.testing.assert_array_equal(fixed["params"]["head"]["kernel"], merged["params"]["head"]["kernel"])
  # A second repair of the architecture (another interpolation) reuses every compiled pass.
  other, compiles = backend_compiles(repair.repair, spec, model.apply, va, vb, tree.lerp(va, vb, 0.6), [x], t=0.6)
  assert compiles == 0
  m, _ = _unit_moments(model, other, x, "hidden_0")
  np.testing.assert_allclose(m, 0.4 * _unit_moments(model, va, x, "hidden_0")[0]
                             + 0.6 * _unit_moments(model, vb, x, "hidden_0")[0], rtol=1e-3, atol=1e-3)


def test_repair_of_a_model_with_itself_changes_nothing():
  model = models.build("mlp", features=(6,), num_classes=3)
  va, x = _init(model, (4,), batch=32)
  spec = trace.permutation_spec(model.apply, va, x)
  fixed = repair.repair(spec, model.apply, va, va, va, [x])
  for a, b in zip(jax.tree.leaves(fixed), jax.tree.leaves(va)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _BiasFree(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, use_bias=False, name="hidden_0")(x))
    return nn.Dense(3, name="head")(x)


def test_repair_of_bias_free_layers_is_refused_before_any_pass_or_repairs_their_std():
  model = _BiasFree()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 4)).astype(np.float32)
  va, vb = (model.init(jax.random.key(s), x) for s in (0, 1))
  spec = trace.permutation_spec(model.apply, va, x)
  merged = tree.lerp(va, vb, 0.5)
  passes = []

  def batches():
    passes.append(1)
    return [x]

  with pytest.raises(ValueError, match="params/hidden_0/kernel have no sibling bias"):
    repair.repair(spec, model.apply, va, vb, merged, batches)
  assert len(passes) == 1  # only the first batch's shape was read
  with pytest.raises(ValueError, match="missing_bias"):
    repair.repair(spec, model.apply, va, vb, merged, batches, missing_bias="ignore")

  def moments(v):
    y = np.asarray(x @ v["params"]["hidden_0"]["kernel"])
    return y.mean(0), y.std(0)

  fixed = repair.repair(spec, model.apply, va, vb, merged, batches, missing_bias="scale_only")
  (ma, sa), (mb, sb), (m0, s0), (m, s) = map(moments, (va, vb, merged, fixed))
  np.testing.assert_allclose(s, 0.5 * sa + 0.5 * sb, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(m, m0 * s / s0, rtol=1e-3, atol=1e-3)


# A batched spec: a lax.scan stack of L residual MLP blocks, repaired copy by copy.

L, D, F = 2, 5, 4


def _scanned(p, x):
  def block(h, w):
    return h + jax.nn.relu(h @ w["up"]["kernel"] + w["up"]["bias"]) @ w["down"]["kernel"] + w["down"]["bias"], None

  h = jnp.tanh(x @ p["embed"]["kernel"] + p["embed"]["bias"])
  return jax.lax.scan(block, h, {"up": p["up"], "down": p["down"]})[0] @ p["out"]["kernel"]


def _unrolled(p, x):
  """`_scanned` with its blocks as variables of their own, `up{l}` and `down{l}`."""
  h = jnp.tanh(x @ p["embed"]["kernel"] + p["embed"]["bias"])
  for i in range(L):
    up, down = p[f"up{i}"], p[f"down{i}"]
    h = h + jax.nn.relu(h @ up["kernel"] + up["bias"]) @ down["kernel"] + down["bias"]
  return h @ p["out"]["kernel"]


def _unroll(p):
  out = {k: p[k] for k in ("embed", "out")}
  out.update({f"{k}{i}": jax.tree.map(lambda a, i=i: a[i], p[k]) for k in ("up", "down") for i in range(L)})
  return out


def _stack_params(seed):
  rng = np.random.default_rng(seed)
  shapes = {"embed": {"kernel": (3, D), "bias": (D,)}, "up": {"kernel": (L, D, F), "bias": (L, F)},
            "down": {"kernel": (L, F, D), "bias": (L, D)}, "out": {"kernel": (D, 2)}}
  return jax.tree.map(lambda s: (0.7 * rng.standard_normal(s)).astype(np.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def test_repair_of_a_scanned_stack_is_repair_of_the_unrolled_stack_stacked():
  va, vb = _stack_params(0), _stack_params(1)
  x = np.random.default_rng(2).standard_normal((64, 3)).astype(np.float32)
  spec = trace.permutation_spec(_scanned, va, x)
  assert spec.batch_sizes  # the hidden units: one group per block
  merged = tree.lerp(va, vb, 0.3)
  fixed = repair.repair(spec, _scanned, va, vb, merged, [x], t=0.3)
  ua, ub = _unroll(va), _unroll(vb)
  ufixed = repair.repair(trace.permutation_spec(_unrolled, ua, x), _unrolled, ua, ub, _unroll(merged), [x], t=0.3)
  for path, leaf in tree.leaves_by_path(_unroll(fixed)).items():
    np.testing.assert_allclose(leaf, tree.leaves_by_path(ufixed)[path], rtol=1e-5, atol=1e-5, err_msg=str(path))
  # NumPy: block 1's hidden units (copy 1 of the stacked up kernel) have the interpolated mean and std.
  def hidden(p):
    h = np.tanh(x @ p["embed"]["kernel"] + p["embed"]["bias"])
    h = h + np.maximum(h @ p["up"]["kernel"][0] + p["up"]["bias"][0], 0) @ p["down"]["kernel"][0] + p["down"]["bias"][0]
    y = h @ p["up"]["kernel"][1] + p["up"]["bias"][1]
    return y.mean(0), y.std(0)

  (ma, sa), (mb, sb), (m, s) = hidden(va), hidden(vb), hidden(jax.tree.map(np.asarray, fixed))
  np.testing.assert_allclose(m, 0.7 * ma + 0.3 * mb, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(s, 0.7 * sa + 0.3 * sb, rtol=1e-3, atol=1e-3)
  assert not np.allclose(hidden(merged)[1], s, rtol=1e-2)  # there was something to repair
