"""Tests for mergejax.merge.combine: UnitMaps, and the merged models they give."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax import trace
from mergejax.merge import combine


@hypothesis.given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_partial_map_lays_out_merged_then_kept(merged):
  merged = np.array(merged)
  n, m = merged.size, int(merged.sum())
  um = combine.partial_map(merged)
  assert um.width == 2 * n - m and um.size == n
  assert combine.layout_of({"g": um})["g"] == (m, n - m, n - m)
  np.testing.assert_allclose(um.weight.sum(1), 1.0)
  # Every unit of both models is read back from the merged unit that holds it.
  for k in range(2 * n):
    p = um.unmerge[k]
    assert k in um.index[p][um.weight[p] > 0]
  np.testing.assert_array_equal(um.index[:m, 0], np.flatnonzero(merged))
  np.testing.assert_array_equal(um.index[:m, 1], np.flatnonzero(merged) + n)


def _mlp(v, x):
  h = jax.nn.relu(x @ v["l1"]["k"] + v["l1"]["b"])
  h = jax.nn.relu(h @ v["l2"]["k"] + v["l2"]["b"])
  return h @ v["out"]["k"] + v["out"]["b"]


def _mlp_init(key, widths):
  ks = jax.random.split(key, 6)
  (d0, d1, d2, d3) = widths
  return {"l1": {"k": jax.random.normal(ks[0], (d0, d1)), "b": jax.random.normal(ks[1], (d1,))},
          "l2": {"k": jax.random.normal(ks[2], (d1, d2)), "b": jax.random.normal(ks[3], (d2,))},
          "out": {"k": jax.random.normal(ks[4], (d2, d3)), "b": jax.random.normal(ks[5], (d3,))}}


def _inputs(apply_fn, variables, x):
  _, uses = trace.kernel_uses(apply_fn)(variables, x)
  return {p: frozenset(k for u in us for _, k in u.input_axes) for p, us in uses.items()}


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(2, 6), st.integers(1, 3)),
                  st.integers(0, 99))
def test_keeping_everything_computes_the_ensemble(widths, seed):
  va, vb = _mlp_init(jax.random.key(seed), widths), _mlp_init(jax.random.key(seed + 1), widths)
  x = jax.random.normal(jax.random.key(seed + 2), (5, widths[0]))
  spec = mj.permutation_spec(_mlp, va, x)
  maps = {g: combine.partial_map(np.zeros(n, bool)) for g, n in spec.sizes.items()}
  merged = combine.combine(spec, maps, va, vb, inputs=_inputs(_mlp, va, x))
  np.testing.assert_allclose(_mlp(merged, x), (_mlp(va, x) + _mlp(vb, x)) / 2, rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.integers(0, 99), st.floats(0.0, 1.0))
def test_merging_a_permuted_copy_of_itself_gives_the_model(seed, ratio):
  va = _mlp_init(jax.random.key(seed), (3, 5, 4, 2))
  x = jax.random.normal(jax.random.key(seed + 2), (5, 3))
  spec = mj.permutation_spec(_mlp, va, x)
  perm = mj.random_permutation(spec, jax.random.key(seed + 3))
  # Aligned by the inverse permutation: weight matching's coordinate descent can stop short of it on units this
  # few (seed 87: two hidden units of 4 left swapped), which is weight matching's property, not combine's.
  vb = mj.apply_permutation(spec, mj.invert_permutation(perm), mj.apply_permutation(spec, perm, va))
  rng = np.random.default_rng(seed)
  full = {g: combine.partial_map(np.ones(n, bool)) for g, n in spec.sizes.items()}
  merged = combine.combine(spec, full, va, vb, inputs=_inputs(_mlp, va, x))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(va)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Any partial merge of two identical models computes that model.
  part = {g: combine.partial_map(rng.random(n) < ratio) for g, n in spec.sizes.items()}
  merged = combine.combine(spec, part, va, vb, inputs=_inputs(_mlp, va, x))
  np.testing.assert_allclose(_mlp(merged, x), _mlp(va, x), rtol=1e-5, atol=1e-5)


def test_a_dense_kernel_matches_the_block_formula():
  rng = np.random.default_rng(0)
  w_a, w_b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
  m_in = combine.partial_map([True, False, True, False])
  m_out = combine.partial_map([False, True, True])
  got = np.asarray(combine.combine_leaf([w_a, w_b], [combine.Axis(0, m_in, True), combine.Axis(1, m_out, False)]))
  # The reference: rows are inputs (merged 0, 2 | A 1, 3 | B 1, 3), columns outputs (merged 1, 2 | A 0 | B 0).
  ins = [("m", 0), ("m", 2), ("a", 1), ("a", 3), ("b", 1), ("b", 3)]
  outs = [("m", 1), ("m", 2), ("a", 0), ("b", 0)]
  for p, (si, i) in enumerate(ins):
    for q, (so, j) in enumerate(outs):
      if so == "m":  # a merged output averages both models' contributions to it
        want = (w_a[i, j] * (si in "ma") + w_b[i, j] * (si in "mb")) / 2
      else:  # a kept output reads its own model's (and merged) inputs, whole
        w = w_a if so == "a" else w_b
        want = w[i, j] if si in ("m", so) else 0.0
      np.testing.assert_allclose(got[p, q], want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name,config,shape", [
    ("vgg", dict(features=(4, "M", 6), dense=(7,), num_classes=3), (4, 8, 8, 3)),
    ("resnet20", dict(num_classes=3), (4, 8, 8, 3)),
    ("vit", dict(patch_size=4, embed_dim=8, depth=1, num_heads=2, head_dim=4, mlp_dim=8, num_classes=3), (4, 8, 8, 3)),
])
def test_zoo_models_built_from_the_layout_run_the_combined_variables(name, config, shape):
  model = models.build(name, **config)
  x = jax.random.normal(jax.random.key(0), shape)
  va, vb = model.init(jax.random.key(1), x, train=False), model.init(jax.random.key(2), x, train=False)
  apply = functools.partial(model.apply, train=False)
  spec = models.permutation_spec(name, va, **config)
  inputs = _inputs(apply, va, x)
  fixed = combine.fixed_groups(spec, inputs)
  assert fixed == models.config(name, **config).fixed_groups()
  rng = np.random.default_rng(0)
  maps = {g: combine.partial_map(np.ones(n, bool) if g in fixed else np.zeros(n, bool))
          for g, n in spec.sizes.items()}
  merged = combine.combine(spec, maps, va, vb, inputs=inputs)
  out = models.build(name, combine.layout_of(maps), **config).apply(merged, x, train=False)
  if name != "vit":  # no normalisation across a widened group: the ensemble, exactly
    np.testing.assert_allclose(out, (apply(va, x) + apply(vb, x)) / 2, rtol=1e-4, atol=1e-4)
  maps = {g: combine.partial_map(np.ones(n, bool) if g in fixed else rng.random(n) < 0.5)
          for g, n in spec.sizes.items()}
  merged = combine.combine(spec, maps, va, vb, inputs=inputs)
  out = models.build(name, combine.layout_of(maps), **config).apply(merged, x, train=False)
  assert out.shape == apply(va, x).shape and np.all(np.isfinite(out))


def test_the_host_combine_equals_the_compiled_one():
  """backend="host" (NumPy, the default for CPU arrays) and "device" (one jitted program) merge every leaf the
  same, with input and output axes, models=(0,) leaves and a fused axis cut into parts."""
  rng = np.random.default_rng(4)
  va, vb = _mlp_init(jax.random.key(7), (3, 6, 5, 4)), _mlp_init(jax.random.key(8), (3, 6, 5, 4))
  x = jax.random.normal(jax.random.key(9), (5, 3))
  spec = mj.permutation_spec(_mlp, va, x)
  maps = {g: combine.partial_map(rng.random(n) < 0.5) for g, n in spec.sizes.items()}
  kw = dict(inputs=_inputs(_mlp, va, x), models={("out", "k"): (0,), ("out", "b"): (0,)})
  host = combine.combine(spec, maps, va, vb, backend="host", **kw)
  device = combine.combine(spec, maps, va, vb, backend="device", **kw)
  assert jax.tree.structure(host) == jax.tree.structure(device)
  for h, d in zip(jax.tree.leaves(host), jax.tree.leaves(device)):
    assert isinstance(h, jax.Array) and h.shape == d.shape and h.dtype == d.dtype
    np.testing.assert_allclose(h, d, rtol=1e-6, atol=1e-6)
  assert any(h.shape != a.shape for h, a in zip(jax.tree.leaves(host), jax.tree.leaves(va)))  # widened
  ref = lambda part: combine.spec_lib.AxisRef(("w",), 1, part=part)
  fused = combine.spec_lib.PermutationSpec({"q": (ref((0, 4)),), "v": (ref((6, 9)),)}, {"q": 4, "v": 3})
  wa, wb = {"w": jnp.asarray(rng.standard_normal((2, 9)))}, {"w": jnp.asarray(rng.standard_normal((2, 9)))}
  fmaps = {"q": combine.partial_map([True, False, True, False]), "v": combine.partial_map([False, True, False])}
  np.testing.assert_allclose(combine.combine(fused, fmaps, wa, wb, backend="host")["w"],
                             combine.combine(fused, fmaps, wa, wb, backend="device")["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="backend"):
    combine.combine(spec, maps, va, vb, backend="gpu", **kw)
