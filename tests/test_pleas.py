"""Tests for mergejax.merge.pleas: the identities of DESIGN.md, the budget, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models

def _mlp(v, x):
  """A plain function whose widths follow its variables' shapes."""
  h = jax.nn.relu(x @ v["l1"]["kernel"] + v["l1"]["bias"])
  h = jax.nn.relu(h @ v["l2"]["kernel"] + v["l2"]["bias"])
  if "head_0" in v:
    return tuple(h @ v[k]["kernel"] + v[k]["bias"] for k in ("head_0", "head_1"))
  return h @ v["head"]["kernel"] + v["head"]["bias"]


def _init(key, widths, heads):
  keys = iter(jax.random.split(key, 8))
  dense = lambda i, o: {"kernel": jax.random.normal(next(keys), (i, o)) / np.sqrt(i),
                        "bias": 0.1 * jax.random.normal(next(keys), (o,))}
  v = {"l1": dense(6, widths[0]), "l2": dense(*widths)}
  v.update({f"head_{k}": dense(widths[1], c) for k, c in enumerate(heads)} if len(heads) > 1
           else {"head": dense(widths[1], heads[0])})
  return v


def _models(seed=0, widths=(12, 10), heads=(3,)):
  x = jax.random.normal(jax.random.key(seed), (48, 6))
  va, vb = _init(jax.random.key(seed + 1), widths, heads), _init(jax.random.key(seed + 2), widths, heads)
  return _mlp, va, vb, [x[:20], x[20:40], x[40:]]


def _nonzero_cost(apply_fn, merged, x):
  """MACs per example of the merged kernels' non-zero entries, over the original's."""
  from mergejax import trace
  _, uses = trace.kernel_uses(apply_fn)(merged, x)
  leaves = mj.tree.leaves_by_path(merged)
  total = 0.0
  for path, us in uses.items():
    k = np.asarray(leaves[path])
    total += sum(np.prod(u.output.shape) / u.output.shape[0] / k.shape[-1] * np.count_nonzero(k) for u in us)
  return total


def test_budget_two_is_the_ensemble_and_budget_one_of_a_copy_is_the_model():
  apply_fn, va, vb, batches = _models()
  x = jnp.concatenate(batches)
  merged, layout = mj.merge.pleas(apply_fn, va, vb, batches, budget=2.0, progress=False)
  assert all(g.n_merged == 0 for g in layout.values())
  np.testing.assert_allclose(apply_fn(merged, x), (apply_fn(va, x) + apply_fn(vb, x)) / 2, rtol=1e-4, atol=1e-4)
  spec = mj.permutation_spec(apply_fn, va, x)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(7)), va)
  merged, layout = mj.merge.pleas(apply_fn, va, copy, batches, budget=1.0, progress=False)
  assert all(g.n_a == g.n_b == 0 for g in layout.values())
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(va)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("budget,allocation", [(1.2, "exact"), (1.8, "exact"), (1.5, "uniform")])
def test_the_merged_models_nonzero_flops_meet_the_budget(budget, allocation):
  apply_fn, va, vb, batches = _models()
  x = batches[0]
  merged, layout, report = mj.merge.pleas(apply_fn, va, vb, batches, budget=budget, allocation=allocation,
                                                progress=False, report=True)
  original = _nonzero_cost(apply_fn, va, x)
  cost = _nonzero_cost(apply_fn, merged, x) / original
  assert cost <= budget + 1e-9
  assert report.allocation.cost == pytest.approx(cost, abs=1e-9)
  # Within one grid step: merging one step less in any group would break the budget...
  if allocation == "uniform":
    assert cost > budget - 0.2
  assert apply_fn(merged, x).shape == apply_fn(va, x).shape
  for rep in report.layers:  # the solve never does worse than the combined weights
    assert rep.residual_after <= rep.residual_before + 1e-4


def test_least_squares_lowers_the_error_against_the_ensemble():
  apply_fn, va, vb, batches = _models()
  x = jnp.concatenate(batches)
  ensemble = (apply_fn(va, x) + apply_fn(vb, x)) / 2
  errors = {}
  for fit in (False, True):
    merged, _ = mj.merge.pleas(apply_fn, va, vb, batches, budget=1.3, least_squares_fit=fit, progress=False)
    errors[fit] = float(jnp.mean((apply_fn(merged, x) - ensemble) ** 2))
  assert errors[True] < errors[False]


def test_merged_inputs_fit_each_layer_on_the_merged_models_own_features():
  apply_fn, va, vb, batches = _models()
  x = np.asarray(jnp.concatenate(batches), np.float64)
  ridge = 1e-2
  merged, layout = mj.merge.pleas(apply_fn, va, vb, batches, budget=1.0, inputs="merged", ridge=ridge,
                                  progress=False)
  assert all(g.n_a == g.n_b == 0 for g in layout.values())
  spec = mj.permutation_spec(apply_fn, va, batches[0])
  vb = mj.apply_permutation(spec, mj.weight_matching(spec, va, vb, key=jax.random.key(0)).perm, vb)
  va, vb, merged = (jax.tree.map(lambda a: np.asarray(a, np.float64), v) for v in (va, vb, merged))
  relu = lambda h: np.maximum(h, 0.0)
  hidden = lambda v, h, name: relu(h @ v[name]["kernel"] + v[name]["bias"])
  inputs = {"l1": (x, x, x)}
  inputs["l2"] = tuple(hidden(v, x, "l1") for v in (merged, va, vb))
  inputs["head"] = tuple(hidden(v, h, "l2") for v, h in zip((merged, va, vb), inputs["l2"]))
  for name, (x_m, x_a, x_b) in inputs.items():
    y = (x_a @ va[name]["kernel"] + x_b @ vb[name]["kernel"]) / 2
    w0 = (va[name]["kernel"] + vb[name]["kernel"]) / 2
    g, c = x_m.T @ x_m / len(x), x_m.T @ y / len(x)
    lam = ridge * np.trace(g) / len(g)
    want = np.linalg.solve(g + lam * np.eye(len(g)), c + lam * w0)
    np.testing.assert_allclose(merged[name]["kernel"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
  a, b, _ = _models()[1:]
  merged, _ = mj.merge.pleas(apply_fn, a, b, batches, budget=2.0, inputs="merged", progress=False)
  np.testing.assert_allclose(apply_fn(merged, x), (apply_fn(a, x) + apply_fn(b, x)) / 2, rtol=1e-4, atol=1e-4)


def test_task_heads_each_keep_their_model():
  apply_fn, va, vb, batches = _models(heads=(3, 2))
  x = jnp.concatenate(batches)
  heads = {"a": "head_0", "b": "head_1"}
  merged, _ = mj.merge.pleas(apply_fn, va, vb, batches, budget=2.0, heads=heads, progress=False)
  out_a, out_b = apply_fn(merged, x)
  np.testing.assert_allclose(out_a, apply_fn(va, x)[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out_b, apply_fn(vb, x)[1], rtol=1e-4, atol=1e-4)


def test_zoo_batch_norm_models_are_reset_through_build_fn():
  config = dict(features=(4, "M", 6), dense=(8,), num_classes=3)
  model = models.build("vgg", **config)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  va, vb = model.init(jax.random.key(1), x, train=False), model.init(jax.random.key(2), x, train=False)
  apply_fn = functools.partial(model.apply, train=False)
  spec = models.permutation_spec("vgg", va, **config)
  build_fn = lambda layout: functools.partial(models.build("vgg", layout, **config).apply, train=True,
                                              mutable=["batch_stats"])
  merged, layout = mj.merge.pleas(apply_fn, va, vb, [x], budget=1.5, spec=spec, build_fn=build_fn,
                                        matching="activation", progress=False)
  merged_model = models.build("vgg", layout, **config)
  stats = mj.tree.leaves_by_path(merged["batch_stats"])
  want = mj.repair.reset_batch_norm(build_fn(layout), merged, [x])["batch_stats"]
  for path, leaf in mj.tree.leaves_by_path(want).items():  # the statistics are those of the data
    np.testing.assert_allclose(stats[path], leaf, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(merged_model.apply(merged, x, train=False)))


def test_a_second_merge_compiles_no_gram_pass_and_no_batch_norm_reset(monkeypatch):
  """The Gram pass and the batch-norm reset are compiled once per architecture: a second merge with freshly
  built (equal) functions reuses both programs."""
  from mergejax import repair, stats
  config = dict(features=(4, "M", 6), dense=(8,), num_classes=3)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  model = models.build("vgg", **config)
  va, vb = model.init(jax.random.key(1), x, train=False), model.init(jax.random.key(2), x, train=False)
  spec = models.permutation_spec("vgg", va, **config)
  compiles, inside = [], [None]

  def listener(event, duration_secs, **kwargs):
    if inside[0] and event == "/jax/core/compile/backend_compile_duration":
      compiles.append(inside[0])

  def watched(stage, fn):
    def run(*args, **kwargs):
      inside[0] = stage
      try:
        return fn(*args, **kwargs)
      finally:
        inside[0] = None
    return run

  monkeypatch.setattr(stats, "accumulate", watched("statistics", stats.accumulate))
  monkeypatch.setattr(repair, "reset_batch_norm", watched("repair", repair.reset_batch_norm))

  def merge():
    build_fn = lambda layout: functools.partial(models.build("vgg", layout, **config).apply, train=True,
                                                mutable=["batch_stats"])
    apply_fn = functools.partial(models.build("vgg", **config).apply, train=False)
    return mj.merge.pleas(apply_fn, va, vb, [x[:8], x[8:]], budget=1.5, spec=spec, build_fn=build_fn, chunk=4,
                          matching="identity", allocation="uniform", progress=False)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first, layout = merge()
    assert {"statistics", "repair"} <= set(compiles)
    compiles.clear()
    second, second_layout = merge()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert second_layout == layout
  assert compiles == []
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def _deep_mlp(v, x):
  """Four hidden layers, three of one shape (13 -> 13)."""
  for name in ("l1", "l2", "l3", "l4"):
    x = jax.nn.relu(x @ v[name]["kernel"] + v[name]["bias"])
  return x @ v["head"]["kernel"]


def _deep_init(key):
  keys = iter(jax.random.split(key, 10))
  dense = lambda i, o: {"kernel": jax.random.normal(next(keys), (i, o)) / np.sqrt(i), "bias": jnp.zeros(o)}
  v = {name: dense(7 if name == "l1" else 13, 13) for name in ("l1", "l2", "l3", "l4")}
  v["head"] = {"kernel": jax.random.normal(next(keys), (13, 5)) / np.sqrt(13)}
  return v


def test_the_solves_compile_nothing(monkeypatch):
  """The solves run on the host (BLAS, LAPACK, sparse merge matrices): no XLA compilation per layer or per
  shape, so layers of repeated shapes and a second merge cost no compile time either."""
  from mergejax.merge import least_squares
  compiles, inside = [], [False]

  def listener(event, duration_secs, **kwargs):
    if inside[0] and event == "/jax/core/compile/backend_compile_duration":  # jax's own event name
      compiles.append(duration_secs)

  solve_layer = least_squares.solve_layer

  def watched(*args, **kwargs):
    inside[0] = True
    try:
      return solve_layer(*args, **kwargs)
    finally:
      inside[0] = False

  monkeypatch.setattr(least_squares, "solve_layer", watched)
  x = jax.random.normal(jax.random.key(0), (64, 7))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    merged, _, report = mj.merge.pleas(_deep_mlp, _deep_init(jax.random.key(1)), _deep_init(jax.random.key(2)),
                                       [x[:32], x[32:]], budget=1.5, allocation="uniform", progress=False,
                                       report=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(report.layers) == 5 and all(r.blocks[1] > 0 for r in report.layers[1:4])
  assert len({tuple(np.shape(merged[n]["kernel"])) for n in ("l2", "l3", "l4")}) == 1
  assert compiles == []


def test_bad_input_is_refused_before_any_work():
  apply_fn, va, vb, batches = _models()
  for b in (0.9, 2.1, float("nan")):
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
      mj.merge.pleas(apply_fn, va, vb, batches, budget=b)
  _, vc, _, _ = _models(widths=(12, 11))
  with pytest.raises(ValueError, match="head/kernel"):
    mj.merge.pleas(apply_fn, va, vc, batches, budget=1.5)
  with pytest.raises(ValueError, match="empty"):
    mj.merge.pleas(apply_fn, va, vb, [], budget=1.5)
  nan = jax.tree.map(lambda a: a.at[..., 0].set(jnp.nan) if a.ndim == 2 else a, vb)
  with pytest.raises(ValueError, match="NaN"):
    mj.merge.pleas(apply_fn, va, nan, batches, budget=1.5)
  with pytest.raises(ValueError, match="inputs"):
    mj.merge.pleas(apply_fn, va, vb, batches, budget=1.5, inputs="ensemble")
  with pytest.raises(ValueError, match="below"):
    mj.merge.pleas(apply_fn, va, vb, batches, budget=1.1, grid=(0.0, 0.5))
  with pytest.raises(ValueError, match="NaN"):
    mj.merge.pleas(apply_fn, va, vb, [batches[0].at[0, 0].set(jnp.nan)], budget=1.5, progress=False)
