"""Tests for mergejax.merge.compact: merged kernels cut into the blocks they read."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax.merge import budget as budget_lib
from mergejax.merge import combine
from mergejax.merge import compact
from mergejax.merge import kernels as kernels_lib

ZOO = {  # tiny widths; VGG's flatten makes dense_0's input axis a factored (h * w, channels) view
    "resnet20": dict(stage_widths=(4, 6, 8), blocks=(1, 1, 1)),
    "vgg": dict(features=(5, "M", 6), dense=(7,)),
}


def _is_compact(x):
  return isinstance(x, mj.merge.CompactKernel)


def _ratios(layout, sizes):
  return {g: layout[g].n_merged / n for g, n in sizes.items()}


def _random_like(shapes, seed):
  """NumPy-random variables of `shapes` (positive where a leaf is a BatchNorm variance)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 1.5, s.shape) if mj.tree.key_name(p[-1]) == "var"
                    else 0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _zoo_merge(name, seed):
  """Two inits of a tiny zoo model combined with random merged pairs (dense form)."""
  config = ZOO[name]
  x = jax.random.normal(jax.random.key(9), (3, 8, 8, 1))
  model = models.build(name, **config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # compiling init costs a minute on 2 cores
  va, vb = _random_like(shapes, seed), _random_like(shapes, seed + 1)
  spec = models.permutation_spec(name, va, **config)
  rng = np.random.default_rng(seed)
  maps = {g: combine.partial_map(rng.random(n) < 0.5) for g, n in spec.sizes.items()}
  layout = combine.layout_of(maps)
  original_apply = functools.partial(model.apply, train=False)
  inputs = compact.kernel_inputs(original_apply, va, x)
  merged = combine.combine(spec, maps, va, vb, inputs=inputs)
  merged_apply = functools.partial(models.build(name, layout, **config).apply, train=False)
  return dict(spec=spec, layout=layout, va=va, merged=merged, x=x, inputs=inputs, original_apply=original_apply,
              apply=merged_apply, small=compact.compact_variables(spec, layout, merged, inputs=inputs))


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
  return _zoo_merge(request.param, 0)


def test_zoo_compact_model_computes_the_dense_function(zoo):
  dense = jax.jit(zoo["apply"])(zoo["merged"], zoo["x"])
  ours = jax.jit(compact.compact_apply(zoo["apply"]))(zoo["small"], zoo["x"])
  np.testing.assert_allclose(ours, dense, atol=1e-5, rtol=1e-5)
  cut = [p for p, x in jax.tree_util.tree_flatten_with_path(zoo["small"], is_leaf=_is_compact)[0]
         if _is_compact(x)]
  assert cut, "some kernel must be cut into blocks"


def test_dense_variables_restores_the_dense_form_exactly(zoo):
  back = compact.dense_variables(zoo["small"])
  assert jax.tree.structure(back) == jax.tree.structure(zoo["merged"])
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(zoo["merged"])):
    np.testing.assert_array_equal(a, b)


def test_compact_cost_is_the_budget_cost(zoo):
  """Stored entries (params) and multiply-adds (flops) are exactly the budget's cost terms."""
  spec, layout, va = zoo["spec"], zoo["layout"], zoo["va"]
  ratios = _ratios(layout, spec.sizes)
  kernels = kernels_lib.model_kernels(zoo["original_apply"], va, zoo["x"][:1])
  params_terms = kernels_lib.cost_terms(spec, kernels, va, {}, frozenset(), "params")
  assert mj.tree.num_params(zoo["small"]) == pytest.approx(
      budget_lib.relative_cost(params_terms, ratios) * mj.tree.num_params(va), rel=1e-12)
  assert mj.tree.num_params(zoo["merged"]) > mj.tree.num_params(zoo["small"])
  flops_terms = kernels_lib.cost_terms(spec, kernels, va, {}, frozenset(), "flops")
  small = dict(jax.tree_util.tree_flatten_with_path(zoo["small"], is_leaf=_is_compact)[0])
  small = {mj.tree.key_path(p): x for p, x in small.items()}
  macs = 0.0
  for k in kernels:  # positions per example are the original's: a kernel's MACs scale with its entries
    entries = mj.tree.num_params(small[k.path])
    macs += k.macs / np.prod(k.shape) * entries
  assert macs == pytest.approx(budget_lib.relative_cost(flops_terms, ratios) * sum(k.macs for k in kernels),
                               rel=1e-12)


def test_compiled_flops_are_the_block_products():
  """XLA's count for a compact linear chain is 2 x batch x its blocks' entries: nothing runs dense."""
  d, batch = 8, 4
  chain = lambda v, x: ((x @ v["l1"]) @ v["mid"]) @ v["l2"]
  keys = jax.random.split(jax.random.key(0), 3)
  va = {"l1": jax.random.normal(keys[0], (d, d)), "mid": jax.random.normal(keys[1], (d, d)),
        "l2": jax.random.normal(keys[2], (d, 3))}
  vb = jax.tree.map(lambda a: a + 1.0, va)
  x = jnp.ones((batch, d))
  spec = mj.permutation_spec(chain, va, x)
  maps = {g: combine.partial_map(np.arange(n) < 3) for g, n in spec.sizes.items()}
  inputs = compact.kernel_inputs(chain, va, x)
  dense = combine.combine(spec, maps, va, vb, inputs=inputs)
  small = compact.compact_variables(spec, combine.layout_of(maps), dense, inputs=inputs)
  assert _is_compact(small["mid"]) and not _is_compact(small["l1"])
  ours = jax.jit(compact.compact_apply(chain)).lower(small, x).compile().cost_analysis()
  ours = ours[0] if isinstance(ours, (list, tuple)) else ours
  assert ours["flops"] == 2 * batch * mj.tree.num_params(small) < 2 * batch * mj.tree.num_params(dense)
  np.testing.assert_allclose(jax.jit(compact.compact_apply(chain))(small, x), chain(dense, x), rtol=1e-5)


def _two_heads(v, x):
  h = jax.nn.relu(x @ v["l1"]["k"] + v["l1"]["b"])
  h = jnp.tanh(h @ v["l2"]["k"])
  return h @ v["head_a"]["k"], h @ v["head_b"]["k"]


def _two_heads_init(key, d_in, d1, d2, classes):
  ks = jax.random.split(key, 5)
  return {"l1": {"k": jax.random.normal(ks[0], (d_in, d1)), "b": jax.random.normal(ks[1], (d1,))},
          "l2": {"k": jax.random.normal(ks[2], (d1, d2))},
          "head_a": {"k": jax.random.normal(ks[3], (d2, classes))},
          "head_b": {"k": jax.random.normal(ks[4], (d2, classes))}}


@hypothesis.settings(max_examples=6)
@hypothesis.given(st.sampled_from([(5, 4), (3, 6)]), st.data())
def test_compact_equals_dense_for_any_layout(widths, data):
  """A plain function with a task head per model, any merged pairs (so any budget)."""
  seed = data.draw(st.integers(0, 99), label="seed")
  d1, d2 = widths
  va, vb = _two_heads_init(jax.random.key(seed), 3, d1, d2, 2), _two_heads_init(jax.random.key(seed + 1), 3, d1, d2, 2)
  x = jax.random.normal(jax.random.key(seed + 2), (4, 3))
  spec = mj.permutation_spec(_two_heads, va, x)
  maps = {g: combine.partial_map(np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=g)))
          for g, n in spec.sizes.items()}
  heads = {("head_a", "k"): (0,), ("head_b", "k"): (1,)}
  inputs = compact.kernel_inputs(_two_heads, va, x)
  dense = combine.combine(spec, maps, va, vb, inputs=inputs, models=heads)
  layout = combine.layout_of(maps)
  small = compact.compact_variables(spec, layout, dense, inputs=inputs, models=heads)
  for ours, want in zip(compact.compact_apply(_two_heads)(small, x), _two_heads(dense, x)):
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  # A head reads the merged and its own kept units only: never the other model's.
  for head in ("head_a", "head_b"):
    (g,) = [g for g, refs in spec.groups.items() if any(r.path == (head, "k") for r in refs)]
    if layout[g].n_a:
      assert small[head]["k"].arrays[0].shape[0] == spec.sizes[g] < layout[g].width
    else:
      assert not _is_compact(small[head]["k"])
  back = compact.dense_variables(small)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(a, b)


def test_pleas_and_zipit_results_compact_to_the_same_function():
  """PLeaS's least squares and ZipIt!'s zipping keep the structural zeros the compact form drops."""
  va = _two_heads_init(jax.random.key(0), 3, 6, 5, 2)
  vb = _two_heads_init(jax.random.key(1), 3, 6, 5, 2)
  x = jax.random.normal(jax.random.key(2), (32, 3))
  spec = mj.permutation_spec(_two_heads, va, x)
  inputs = compact.kernel_inputs(_two_heads, va, x)
  heads = {"a": "head_a", "b": "head_b"}
  merged, layout = mj.merge.pleas(_two_heads, va, vb, [x], budget=1.5, heads=heads, progress=False)
  small = mj.merge.pleas(_two_heads, va, vb, [x], budget=1.5, heads=heads, progress=False, compact=True)[0]
  np.testing.assert_array_equal(compact.dense_variables(small)["l2"]["k"], merged["l2"]["k"])
  assert any(_is_compact(k) for k in jax.tree.leaves(small, is_leaf=_is_compact))
  for ours, want in zip(compact.compact_apply(_two_heads)(small, x), _two_heads(merged, x)):
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  # Everything kept: each model's kernels and head read only the model's own units.
  zipped, zip_layout, _ = mj.merge.zipit(_two_heads, va, vb, [x], budget=2.0, heads=heads, progress=False)
  small = compact.compact_variables(spec, zip_layout, zipped, inputs=inputs,
                                    models=kernels_lib.head_models(heads, va))
  assert _is_compact(small["l2"]["k"]) and _is_compact(small["head_a"]["k"])
  jax.tree.map(np.testing.assert_array_equal, small,
               mj.merge.zipit(_two_heads, va, vb, [x], budget=2.0, heads=heads, progress=False, compact=True)[0])
  for ours, want in zip(compact.compact_apply(_two_heads)(small, x), _two_heads(zipped, x)):
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_errors_name_the_kernel():
  def square(v, x):
    return jnp.tanh(jnp.tanh(x @ v["l1"]) @ v["l2"]) @ v["l3"]

  va = {"l1": jnp.ones((3, 4)), "l2": jnp.ones((4, 5)), "l3": jnp.ones((5, 2))}
  vb = jax.tree.map(lambda a: 2 * a, va)
  x = jnp.ones((2, 3))
  spec = mj.permutation_spec(square, va, x)
  maps = {g: combine.partial_map(np.arange(n) < 1) for g, n in spec.sizes.items()}
  layout = combine.layout_of(maps)
  inputs = compact.kernel_inputs(square, va, x)
  dense = combine.combine(spec, maps, va, vb, inputs=inputs)
  with pytest.raises(ValueError, match="l2 has entries up to 3 outside the blocks"):
    compact.compact_variables(spec, layout, {**dense, "l2": dense["l2"] + 3.0}, inputs=inputs)
  with pytest.raises(ValueError, match="inputs name nope"):
    compact.compact_variables(spec, layout, dense, inputs={**inputs, ("nope",): frozenset({0})})
  with pytest.raises(ValueError, match="l2 has shape"):
    compact.compact_variables(spec, layout, {**dense, "l2": jnp.zeros((6, 9))}, inputs=inputs)
  with pytest.raises(ValueError, match="no groups"):
    compact.compact_variables(spec, {}, dense, inputs=inputs)
  small = compact.compact_variables(spec, layout, dense, inputs=inputs)
  assert _is_compact(small["l2"])
  transposed = lambda v, x: jnp.tanh(jnp.tanh(x @ v["l1"]) @ v["l2"].T.T) @ v["l3"]
  with pytest.raises(NotImplementedError, match="l2 is read by `transpose`"):
    compact.compact_apply(transposed)(small, x)
  with pytest.raises(NotImplementedError, match="l2 is returned"):
    compact.compact_apply(lambda v, x: v["l2"])(small, x)
  batched = mj.PermutationSpec({"g": [mj.AxisRef(("w",), 1, batch=0)]}, {"g": 2}, batch_sizes={"g": 3})
  with pytest.raises(NotImplementedError, match=r"batched groups \['g'\]"):
    compact.compact_variables(batched, {"g": (1, 1, 1)}, {"w": jnp.zeros((3, 2, 3))}, inputs={})


def test_compact_apply_follows_casts_and_calls():
  def f(v, x):
    h = jnp.tanh(x @ v["l1"])
    inner = jax.jit(lambda h, k: h @ k.astype(jnp.bfloat16).astype(jnp.float32))
    return jax.checkpoint(lambda h: jnp.tanh(inner(h, v["l2"])))(h) @ v["l3"]

  va = {"l1": jax.random.normal(jax.random.key(0), (3, 4)), "l2": jax.random.normal(jax.random.key(1), (4, 5)),
        "l3": jax.random.normal(jax.random.key(2), (5, 2))}
  vb = jax.tree.map(lambda a: -a, va)
  x = jax.random.normal(jax.random.key(3), (2, 3))
  spec = mj.permutation_spec(f, va, x)
  maps = {g: combine.partial_map(np.arange(n) < 2) for g, n in spec.sizes.items()}
  inputs = compact.kernel_inputs(f, va, x)
  dense = combine.combine(spec, maps, va, vb, inputs=inputs)
  small = compact.compact_variables(spec, combine.layout_of(maps), dense, inputs=inputs)
  assert _is_compact(small["l2"])
  np.testing.assert_allclose(jax.jit(compact.compact_apply(f))(small, x), f(dense, x), rtol=1e-5, atol=1e-6)
