"""Tests for mergejax.merge.zipit: identities, budgets, and zoo layouts; on a scanned LM (batched groups),
ZipIt! on the unrolled LM stacked back."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from tests import test_pleas


def test_zipping_a_permuted_copy_gives_the_model_and_keeping_all_the_ensemble():
  apply_fn, va, vb, batches = test_pleas._models()
  x = jnp.concatenate(batches)
  spec = mj.permutation_spec(apply_fn, va, x)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(3)), va)
  merged, layout, alloc = mj.merge.zipit(apply_fn, va, copy, batches, budget=1.0, progress=False)
  assert alloc.cost == pytest.approx(1.0) and all(g.width == spec.sizes[n] for n, g in layout.items())
  np.testing.assert_allclose(apply_fn(merged, x), apply_fn(va, x), rtol=1e-4, atol=1e-4)
  merged, layout, alloc = mj.merge.zipit(apply_fn, va, vb, batches, budget=2.0, progress=False)
  assert alloc.cost == pytest.approx(2.0)
  np.testing.assert_allclose(apply_fn(merged, x), (apply_fn(va, x) + apply_fn(vb, x)) / 2, rtol=1e-4, atol=1e-4)


def test_partial_zipping_meets_the_budget_and_reports_what_it_reached():
  apply_fn, va, vb, batches = test_pleas._models()
  merged, layout, alloc = mj.merge.zipit(apply_fn, va, vb, batches, budget=1.6, progress=False)
  assert alloc.cost <= 1.6 and sorted(alloc.ratios.values()) in ([0.0, 1.0], [1.0, 1.0], [0.0, 0.0])
  assert test_pleas._nonzero_cost(apply_fn, merged, batches[0]) / test_pleas._nonzero_cost(
      apply_fn, va, batches[0]) <= alloc.cost + 1e-9


def test_task_heads_each_keep_their_model():
  apply_fn, va, vb, batches = test_pleas._models(heads=(3, 2))
  x = jnp.concatenate(batches)
  heads = {"a": "head_0", "b": "head_1"}
  merged, _, alloc = mj.merge.zipit(apply_fn, va, vb, batches, budget=2.0, heads=heads, progress=False)
  out_a, out_b = apply_fn(merged, x)
  np.testing.assert_allclose(out_a, apply_fn(va, x)[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out_b, apply_fn(vb, x)[1], rtol=1e-4, atol=1e-4)
  # Each head costs one model's share: zipping everything costs less than 1 + the heads.
  _, _, alloc = mj.merge.zipit(apply_fn, va, vb, batches, budget=1.0, heads=heads, progress=False)
  assert alloc.cost <= 1.0 + 1e-9


def test_zoo_models_run_the_zipped_variables():
  config = dict(features=(4, "M", 6), dense=(8,), num_classes=3)
  model = models.build("vgg", **config)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  va, vb = model.init(jax.random.key(1), x, train=False), model.init(jax.random.key(2), x, train=False)
  spec = models.permutation_spec("vgg", va, **config)
  build_fn = lambda layout: functools.partial(models.build("vgg", layout, **config).apply, train=True,
                                              mutable=["batch_stats"])
  merged, layout, _ = mj.merge.zipit(functools.partial(model.apply, train=False), va, vb, [x], budget=1.0,
                                     spec=spec, build_fn=build_fn, progress=False)
  out = models.build("vgg", layout, **config).apply(merged, x, train=False)
  assert out.shape == (16, 3) and np.all(np.isfinite(out))


# A batched spec (the zoo LM under scan) is zipped copy by copy, the zip-or-keep choice tied across layers.

LM = dict(style="gpt2", embed_dim=8, depth=2, num_heads=2, head_dim=4, max_len=8, mlp_dim=8)
LM_IDS = np.random.default_rng(0).integers(0, 256, (4, 8)).astype(np.int32)
MESH = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # one device: less to compile


def _random(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@functools.cache
def _lm(scan):
  """(config, model, va, vb, hand spec); the unrolled pair is the scanned one unstacked."""
  cfg = dict(LM, scan=scan)
  model = models.build("lm", **cfg)
  if scan:
    shapes = jax.eval_shape(model.init, jax.random.key(0), LM_IDS)
    va, vb = (_random(shapes, seed) for seed in (1, 2))
  else:
    va, vb = (models.lm.unstack_layers(v) for v in _lm(True)[2:4])
  return cfg, model, va, vb, models.permutation_spec("lm", va, **cfg)


def _leaves(variables):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)}


def _zip_lm(scan, budget):
  cfg, model, va, vb, spec = _lm(scan)
  return mj.merge.zipit(model.apply, va, vb, [LM_IDS], budget=budget, spec=spec, mesh=MESH, progress=False)


# 1.0 zips every group, 2.0 none but the head_dim groups (zipped per copy without merges within a model):
# the cuts the unrolled order shares (zipping the stream alone saves nothing, so no cut lies between).
@pytest.mark.parametrize("budget,zipped", [(1.0, {"embed", "blocks.heads", "blocks.mlp"}),
                                           pytest.param(2.0, set(), marks=pytest.mark.slow)])
def test_zipit_on_the_scanned_lm_is_zipit_on_the_unrolled_lm_stacked(budget, zipped):
  merged, layout, alloc = _zip_lm(True, budget)
  umerged, ulayout, ualloc = _zip_lm(False, budget)
  assert {g for g, r in alloc.ratios.items() if r == 1.0} == zipped
  assert alloc.cost == pytest.approx(ualloc.cost, rel=1e-9)
  cfg, ucfg = _lm(True)[0], _lm(False)[0]
  assert set(layout) == set(_lm(True)[4].names)  # the scanned spec's groups: `blocks.X`, one layout per layer
  assert mj.MergeLayout({u: layout[u if u == "embed" else "blocks." + u.split(".", 1)[1]]
                         for u in ulayout}) == ulayout
  got, want = _leaves(merged), _leaves(models.lm.stack_layers(umerged))
  assert set(got) == set(want)
  for path, x in got.items():
    np.testing.assert_allclose(x, want[path], rtol=1e-5, atol=1e-5, err_msg=str(path))
  # The scanned LM is built from zipit's layout as it is, and computes the unrolled merge.
  out = jax.jit(models.build("lm", layout, **cfg).apply)(merged, LM_IDS)
  want = jax.jit(models.build("lm", ulayout, **ucfg).apply)(umerged, LM_IDS)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the identity above keeps the scanned zip in `make test`
def test_zipping_the_scanned_lm_with_a_permuted_copy_of_itself_is_the_model():
  cfg, model, va, _, spec = _lm(True)
  perm = mj.random_permutation(spec, jax.random.key(3))
  assert not np.array_equal(perm["blocks.mlp"][0], perm["blocks.mlp"][1])  # each layer its own permutation
  copy = mj.apply_permutation(spec, perm, va)
  merged, layout, _ = mj.merge.zipit(model.apply, va, copy, [LM_IDS], budget=1.0, spec=spec, mesh=MESH,
                                     progress=False)
  assert layout == mj.MergeLayout.identity(spec.sizes)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(merged, LM_IDS), apply(va, LM_IDS), rtol=1e-4, atol=1e-4)
