"""Tests for mergejax.merge.zipit: identities, budgets, and zoo layouts."""

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
