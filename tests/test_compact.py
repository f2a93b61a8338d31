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


@pytest.mark.parametrize("padding,strides,lhs_dilation,rhs_dilation", [
    ("SAME", (1, 1), (1, 1), (1, 1)),
    (((1, 1), (2, 0)), (2, 1), (1, 1), (1, 1)),
    (((2, 2), (2, 2)), (1, 1), (2, 2), (1, 1)),
    ("SAME", (1, 2), (1, 1), (2, 2)),
])
def test_kernel_macs_count_in_image_taps_as_xla_does(padding, strides, lhs_dilation, rhs_dilation):
  """The budget's FLOPs are XLA's: a convolution's (output position, tap) pairs inside the input."""
  x = jnp.ones((2, 5, 7, 2))
  conv = lambda v, x: jax.lax.conv_general_dilated(x, v["w"], strides, padding, lhs_dilation, rhs_dilation,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  variables = {"w": jnp.ones((3, 3, 2, 4))}
  (kernel,) = kernels_lib.model_kernels(conv, variables, x)
  xla = jax.jit(conv).lower(variables, x).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert 2 * len(x) * kernel.macs == xla["flops"]
  # NumPy reference: the taps whose input index is a real (undilated) unit inside the image.
  out = jax.eval_shape(conv, variables, x).shape
  if isinstance(padding, str):  # the dilated input and window, as lax pads them
    padding = jax.lax.padtype_to_pads(np.multiply(np.subtract(x.shape[1:3], 1), lhs_dilation) + 1,
                                      np.multiply(np.subtract((3, 3), 1), rhs_dilation) + 1, strides, padding)
  inside = 1
  for axis in range(2):
    count = 0
    for o in range(out[1 + axis]):
      for j in range(3):
        index = o * strides[axis] - padding[axis][0] + j * rhs_dilation[axis]
        count += index % lhs_dilation[axis] == 0 and 0 <= index // lhs_dilation[axis] < x.shape[1 + axis]
    inside *= count
  assert kernel.macs == inside * 2 * 4
  assert kernel.positions == out[1] * out[2]


def _grid_fn(v, x):
  """x: f32[batch, n1, n2] -> f32[batch, c]: a kernel with two grouped input and two grouped output axes."""
  y = jnp.einsum("bij,ijkl->bkl", x, v["w"])
  return jnp.einsum("bkl,klc->bc", jnp.tanh(y), v["out"])


def test_kernels_with_several_kept_groups_on_each_side():
  """Outputs kept from A in one group and B in another read nothing (zeros); A outputs read the inputs
  whose every group is merged or A's; merged outputs read all."""
  sizes = {"i": 4, "j": 3, "k": 5, "l": 4}
  spec = mj.PermutationSpec({"i": [mj.AxisRef(("w",), 0)], "j": [mj.AxisRef(("w",), 1)],
                             "k": [mj.AxisRef(("w",), 2), mj.AxisRef(("out",), 0)],
                             "l": [mj.AxisRef(("w",), 3), mj.AxisRef(("out",), 1)]}, sizes)
  rng = np.random.default_rng(0)
  va, vb = ({"w": rng.standard_normal((4, 3, 5, 4)).astype(np.float32),
             "out": rng.standard_normal((5, 4, 2)).astype(np.float32)} for _ in range(2))
  maps = {g: combine.partial_map(np.arange(n) % 2 == 0) for g, n in sizes.items()}
  layout = combine.layout_of(maps)
  inputs = {("w",): frozenset({0, 1}), ("out",): frozenset({0, 1})}
  dense = combine.combine(spec, maps, va, vb, inputs=inputs)
  small = compact.compact_variables(spec, layout, dense, inputs=inputs)
  assert _is_compact(small["w"]) and not _is_compact(small["out"])  # out's outputs are not grouped
  kb = small["w"].plan.pieces[0][2]
  assert kb.input_axes == (0, 1) and kb.output_axes == (2, 3)
  # 3 x 3 output cells (merged | A | B per group), of which (A, B) and (B, A) read nothing.
  assert sorted(b.name for b in kb.blocks) == ["a_aa", "a_am", "a_ma", "b_bb", "b_bm", "b_mb", "merged_mm"]
  x = jnp.asarray(rng.standard_normal((3, layout["i"].width, layout["j"].width)), jnp.float32)
  np.testing.assert_allclose(jax.jit(compact.compact_apply(_grid_fn))(small, x), _grid_fn(dense, x),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(compact.dense_variables(small)), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(a, b)
  # Stored entries: merged outputs x every input, kept outputs x the merged and their own inputs.
  m = {g: layout[g].n_merged for g in sizes}
  kept = {g: layout[g].n_a for g in sizes}
  width = {g: layout[g].width for g in sizes}
  side = lambda g: m[g] + kept[g]  # merged and one model's units
  a_outputs = side("k") * side("l") - m["k"] * m["l"]
  assert mj.tree.num_params(small["w"]) == (m["k"] * m["l"] * width["i"] * width["j"]
                                            + 2 * a_outputs * side("i") * side("j"))


ATTENTION = {  # tiny widths; the lm is GPT-2's layout, q | k | v fused in one kernel (attn_qkv)
    "vit": (dict(patch_size=4, embed_dim=8, depth=1, num_heads=4, head_dim=2, mlp_dim=6, num_classes=3),
            lambda: np.random.default_rng(3).standard_normal((4, 8, 8, 1)).astype(np.float32)),
    "lm": (dict(style="gpt2", embed_dim=8, depth=1, num_heads=4, head_dim=2, max_len=8, mlp_dim=8),
           lambda: np.random.default_rng(3).integers(0, 256, (4, 6)).astype(np.int32)),
}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_models_compact_after_pleas(name):
  """PLeaS at 1.5 with heads widened: the compact model computes the dense one's function and
  stores exactly the budget's parameters (a fused q | k | v kernel cut per part)."""
  config, data = ATTENTION[name]
  x = data()
  model = models.build(name, **config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  va, vb = _random_like(shapes, 0), _random_like(shapes, 1)
  spec = models.permutation_spec(name, va, **config)
  apply = model.apply if name == "lm" else functools.partial(model.apply, train=False)
  # One grid ratio, 3/4, for every group but the head_dim ones: a quarter of the heads kept from each model.
  small, layout = mj.merge.pleas(apply, va, vb, [x], budget=1.5, spec=spec, allocation="uniform", grid=(0.75, 1.0),
                                 progress=False, compact=True)
  assert layout["block0.heads"].n_a == 1
  attention = [k for p, k in jax.tree_util.tree_flatten_with_path(small, is_leaf=_is_compact)[0]
               if _is_compact(k) and "att" in mj.tree.path_str(mj.tree.key_path(p))]
  assert len(attention) == (2 if name == "lm" else 4)  # qkv and out, or query, key, value and out
  if name == "lm":
    assert [len(k.plan.pieces) for k in attention] == [1, 3]  # attn_out; attn_qkv cut into q | k | v
  merged_apply = models.build(name, layout, **config).apply
  merged_apply = merged_apply if name == "lm" else functools.partial(merged_apply, train=False)
  np.testing.assert_allclose(jax.jit(compact.compact_apply(merged_apply))(small, x),
                             merged_apply(compact.dense_variables(small), x), rtol=1e-5, atol=1e-5)
  kernels = kernels_lib.model_kernels(apply, va, x[:1])
  terms = kernels_lib.cost_terms(spec, kernels, va, {}, frozenset(), "params")
  assert mj.tree.num_params(small) == pytest.approx(
      budget_lib.relative_cost(terms, _ratios(layout, spec.sizes)) * mj.tree.num_params(va), rel=1e-12)


def test_fused_input_axis_with_kept_units_is_refused():
  refs = [("g1", mj.AxisRef(("w",), 0, part=(0, 2))), ("g2", mj.AxisRef(("w",), 0, part=(2, 5)))]
  layout = mj.MergeLayout({"g1": (1, 1, 1), "g2": (3, 0, 0)})
  with pytest.raises(NotImplementedError, match="w has input axis 0 cut into parts"):
    compact.kernel_blocks(("w",), (6, 4), refs, {"g1": 2, "g2": 3}, frozenset({0}), layout)
  assert compact.kernel_blocks(("w",), (5, 4), refs, {"g1": 2, "g2": 3}, frozenset({0}),
                               mj.MergeLayout({"g1": (2, 0, 0), "g2": (3, 0, 0)})) is None
  with pytest.raises(ValueError, match="w has shape"):
    compact.kernel_blocks(("w",), (5, 4), refs, {"g1": 2, "g2": 3}, frozenset({1}), layout)
