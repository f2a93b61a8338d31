"""Tests for mergejax.trace: traced specs against hand-written ones, and invariance.

The oracle for a traced spec is twofold: it equals the spec written by hand
(as sets of AxisRefs, group names aside), and a random permutation drawn from
it leaves the function's outputs unchanged while a permutation of a single
axis of a group changes them.
"""

import math
import warnings

import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import models
from mergejax import permute
from mergejax import trace
from mergejax.spec import AxisRef, PermutationSpec
from test_models import DIGITS, SMALL, _init


def _as_sets(spec) -> set[tuple[int, frozenset]]:
  return {(spec.sizes[g], frozenset(refs)) for g, refs in spec.groups.items()}


def _random_stats(variables, seed=1):
  """Non-trivial BatchNorm running statistics (mean anything, var positive)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name == "['var']":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "['mean']":
      return rng.standard_normal(leaf.shape).astype(np.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, variables)


def _assert_invariant(fn, variables, spec, *args, seed=0):
  perm = permute.random_permutation(spec, jax.random.key(seed))
  permuted = permute.apply_permutation(spec, perm, variables)
  out, out_p = jax.jit(fn)(variables, *args), jax.jit(fn)(permuted, *args)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _assert_one_axis_breaks(fn, variables, spec, *args):
  """Permuting one axis of the largest group alone changes the outputs."""
  g = max(spec.sizes, key=spec.sizes.get)
  ref = spec.groups[g][0]
  broken = PermutationSpec({g: [ref]}, {g: spec.sizes[g]})
  perm = {g: np.roll(np.arange(spec.sizes[g]), 1)}
  out = jax.jit(fn)(variables, *args)
  out_p = jax.jit(fn)(permute.apply_permutation(broken, perm, variables), *args)
  assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-4)
             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_p)))


ZOO = [(name, 10) for name in SMALL] + [("mlp", (3, 4)), ("resnet50", (3, 4)), ("vit", (3, 4))]


@pytest.mark.parametrize("name,num_classes", ZOO)
def test_zoo_traced_spec_equals_hand_spec_and_preserves_outputs(name, num_classes):
  config, input_shape = SMALL[name]
  config = {**config, "num_classes": num_classes}
  model = models.build(name, **config)
  variables, x = _init(model, input_shape, batch=3)
  variables = _random_stats(variables)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every primitive of the zoo is known
    traced = trace.permutation_spec(model.apply, variables, x)
  hand = models.permutation_spec(name, variables, **config)
  assert _as_sets(traced) == _as_sets(hand)
  _assert_invariant(model.apply, variables, traced, x)
  _assert_one_axis_breaks(model.apply, variables, traced, x)


def test_vgg_flatten_before_dense_is_a_factored_axis():
  config = dict(features=(3, "M", 4), dense=(5,))
  model = models.build("vgg", **config)
  variables, x = _init(model, DIGITS)
  spec = trace.permutation_spec(model.apply, variables, x)
  (group,) = [g for g, refs in spec.groups.items()
              if AxisRef(("params", "conv_1", "kernel"), 3) in refs]
  assert AxisRef(("params", "dense_0", "kernel"), 0, ((16, 4), 1)) in spec.groups[group]


def test_batch_stats_returned_under_mutable_stay_permutable():
  config, input_shape = SMALL["resnet20"]
  model = models.build("resnet20", **config)
  variables, x = _init(model, input_shape)

  def train_apply(v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"])

  spec = trace.permutation_spec(train_apply, variables, x)
  assert _as_sets(spec) == _as_sets(trace.permutation_spec(model.apply, variables, x))
  # The permuted model's logits are the same; its new statistics are the
  # original's new statistics, permuted.
  perm = permute.random_permutation(spec, jax.random.key(0))
  logits, updates = jax.jit(train_apply)(variables, x)
  logits_p, updates_p = jax.jit(train_apply)(permute.apply_permutation(spec, perm, variables), x)
  np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
  expected = permute.apply_permutation(spec, perm, {**variables, **updates})["batch_stats"]
  for a, b in zip(jax.tree.leaves(updates_p), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# Plain jax.numpy: a pre-norm transformer with multi-head attention written
# with reshapes, RMSNorm and a gated MLP, and a CNN with a flatten.

D, H, HD, F, DIN, C = 8, 2, 3, 10, 5, 4


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _transformer(params, x):
  b, t, _ = x.shape
  h = x @ params["embed"]
  for blk in params["blocks"]:
    y = _layer_norm(h, blk["ln_scale"], blk["ln_bias"])
    q, k, v = ((y @ blk[w]).reshape(b, t, H, HD) for w in ("wq", "wk", "wv"))
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HD), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, H * HD)
    h = h + o @ blk["wo"] + blk["bo"]
    y = h * jax.lax.rsqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6) * blk["rms_scale"]
    h = h + (jax.nn.silu(y @ blk["w_gate"]) * (y @ blk["w_up"])) @ blk["w_down"]
  return _layer_norm(h, 1.0, 0.0).mean(1) @ params["head"]


def _transformer_params(num_blocks=2, seed=0):
  rng = np.random.default_rng(seed)

  def w(*shape):
    return (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)

  blocks = [dict(
      ln_scale=1 + 0.1 * w(D), ln_bias=w(D), wq=w(D, H * HD), wk=w(D, H * HD), wv=w(D, H * HD),
      wo=w(H * HD, D), bo=w(D), rms_scale=1 + 0.1 * w(D), w_gate=w(D, F), w_up=w(D, F), w_down=w(F, D),
  ) for _ in range(num_blocks)]
  return {"embed": w(DIN, D), "blocks": blocks, "head": w(D, C)}


def _transformer_hand_spec(num_blocks=2):
  def ref(*path, axis, factor=None):
    return AxisRef(tuple(str(p) for p in path), axis, factor)

  heads, within = ((H, HD), 0), ((H, HD), 1)
  groups = {"stream": [ref("embed", axis=1), ref("head", axis=0)]}
  sizes = {"stream": D}
  for i in range(num_blocks):
    b = ("blocks", i)
    groups["stream"] += [ref(*b, n, axis=0) for n in ("ln_scale", "ln_bias", "wq", "wk", "wv", "bo",
                                                     "rms_scale", "w_gate", "w_up")]
    groups["stream"] += [ref(*b, "wo", axis=1), ref(*b, "w_down", axis=1)]
    groups[f"heads{i}"] = [ref(*b, w, axis=1, factor=heads) for w in ("wq", "wk", "wv")]
    groups[f"heads{i}"].append(ref(*b, "wo", axis=0, factor=heads))
    groups[f"qk{i}"] = [ref(*b, w, axis=1, factor=within) for w in ("wq", "wk")]
    groups[f"vo{i}"] = [ref(*b, "wv", axis=1, factor=within), ref(*b, "wo", axis=0, factor=within)]
    groups[f"mlp{i}"] = [ref(*b, "w_gate", axis=1), ref(*b, "w_up", axis=1), ref(*b, "w_down", axis=0)]
    sizes.update({f"heads{i}": H, f"qk{i}": HD, f"vo{i}": HD, f"mlp{i}": F})
  return PermutationSpec(groups, sizes)


def test_plain_jnp_transformer_heads_residual_stream_gated_mlp():
  params = _transformer_params()
  x = np.random.default_rng(1).standard_normal((2, 5, DIN)).astype(np.float32)
  spec = trace.permutation_spec(_transformer, params, x)
  assert _as_sets(spec) == _as_sets(_transformer_hand_spec())
  _assert_invariant(_transformer, params, spec, x)
  _assert_one_axis_breaks(_transformer, params, spec, x)


def _cnn(params, x):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME", dimension_numbers=dn)
  h = jax.nn.relu(h + params["conv_bias"])
  h = jax.nn.gelu(h.reshape(h.shape[0], -1) @ params["dense"])
  return h @ params["out"]


def test_plain_jnp_flatten_before_dense():
  rng = np.random.default_rng(0)
  params = {
      "conv": rng.standard_normal((3, 3, 2, 6)).astype(np.float32),
      "conv_bias": rng.standard_normal(6).astype(np.float32),
      "dense": rng.standard_normal((4 * 4 * 6, 7)).astype(np.float32) / 10,
      "out": rng.standard_normal((7, 3)).astype(np.float32),
  }
  x = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
  spec = trace.permutation_spec(_cnn, params, x)
  expected = {
      (6, frozenset([AxisRef(("conv",), 3), AxisRef(("conv_bias",), 0),
                     AxisRef(("dense",), 0, ((16, 6), 1))])),
      (7, frozenset([AxisRef(("dense",), 1), AxisRef(("out",), 0)])),
  }
  assert _as_sets(spec) == expected
  _assert_invariant(_cnn, params, spec, x)


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_and_depthwise_convolutions(groups):
  rng = np.random.default_rng(0)
  c = 6
  params = {
      "pointwise": rng.standard_normal((1, 1, 3, c)).astype(np.float32),
      "grouped": rng.standard_normal((3, 3, c // groups, c)).astype(np.float32),
      "head": rng.standard_normal((c, 2)).astype(np.float32),
  }

  def fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, p["pointwise"], (1, 1), "SAME", dimension_numbers=dn)
    h = jax.lax.conv_general_dilated(jnp.tanh(h), p["grouped"], (1, 1), "SAME",
                                     dimension_numbers=dn, feature_group_count=groups)
    return jnp.tanh(h).mean((1, 2)) @ p["head"]

  x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
  spec = trace.permutation_spec(fn, params, x)
  assert sum(spec.sizes.values()) > 0
  _assert_invariant(fn, params, spec, x)
  _assert_one_axis_breaks(fn, params, spec, x)
  if groups == c:  # depthwise: each channel keeps its filter, so one group throughout
    assert _as_sets(spec) == {(c, frozenset([
        AxisRef(("pointwise",), 3), AxisRef(("grouped",), 3), AxisRef(("head",), 0)]))}


def test_flax_nnx_through_split():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 16, rngs=rngs)
      self.norm = nnx.LayerNorm(16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.norm(self.l1(x))))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))

  def fn(state, x):
    return nnx.merge(graphdef, state)(x)

  x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
  spec = trace.permutation_spec(fn, state, x)
  (refs,) = spec.groups.values()
  # nnx.State leaves are Variables, whose array is under the key "value".
  assert {(r.path[:2], r.axis) for r in refs} == {
      (("l1", "kernel"), 1), (("l1", "bias"), 0), (("norm", "scale"), 0),
      (("norm", "bias"), 0), (("l2", "kernel"), 0)}
  _assert_invariant(fn, state, spec, x)


@pytest.mark.parametrize("op, why", [
    (lambda h: jnp.cumsum(h, axis=-1), "cumsum"),
    (lambda h: jnp.sort(h, axis=-1), "sort"),
    (lambda h: jnp.pad(h, ((0, 0), (1, 0)))[:, :-1], "pad"),
    (lambda h: h[:, ::-1], "rev"),
    # iota is the function's structure (DESIGN.md, Tracer): fixed without a warning.
    (lambda h: h * jnp.arange(h.shape[-1]), None),
    (lambda h: h + jax.nn.one_hot(jnp.argmax(h, -1), h.shape[-1]), None),
])
def test_operations_that_order_units_fix_them(op, why):
  rng = np.random.default_rng(0)
  params = {"w1": rng.standard_normal((4, 6)).astype(np.float32),
            "w2": rng.standard_normal((6, 2)).astype(np.float32)}

  def fn(p, x):
    return op(jnp.tanh(x @ p["w1"])) @ p["w2"]

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec = trace.permutation_spec(fn, params, np.ones((3, 4), np.float32))
  assert not spec.groups
  messages = [str(w.message) for w in caught]
  if why is None:
    assert not messages
  else:
    assert len(messages) == 1 and f"{why} fixed axes of w1, w2" in messages[0]


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["closed_over", "inside_jit"])
def test_a_constant_array_fixes_only_the_axes_it_varies_along(wrap):
  rng = np.random.default_rng(0)
  params = {"w1": rng.standard_normal((4, 6)).astype(np.float32),
            "w2": rng.standard_normal((6, 2)).astype(np.float32)}
  x = rng.standard_normal((3, 4)).astype(np.float32)
  varying = rng.standard_normal((5, 6)).astype(np.float32)  # closed over: a constvar of the jaxpr
  alike = np.tile(rng.standard_normal((5, 1)).astype(np.float32), (1, 6))  # varies along axis 0 only

  def fn(table):  # inside jit, the table is a constant of the inner jaxpr, not of the outer one
    scaled = wrap(lambda h: (h[:, None, :] * table).sum(1))
    return lambda p, x: scaled(jnp.tanh(x @ p["w1"])) @ p["w2"]

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec = trace.permutation_spec(fn(varying), params, x)
  assert not spec.groups
  assert len(caught) == 1 and "a constant array fixed axes of w1, w2" in str(caught[0].message)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spec = trace.permutation_spec(fn(alike), params, x)
  (group,) = spec.groups.values()
  assert {(r.path, r.axis) for r in group} == {(("w1",), 1), (("w2",), 0)}
  perm = np.array([3, 0, 5, 1, 4, 2])
  moved = {"w1": params["w1"][:, perm], "w2": params["w2"][perm]}
  np.testing.assert_allclose(fn(alike)(moved, x), fn(alike)(params, x), rtol=1e-5)


def test_slices_concatenated_back_are_parts_of_one_axis():
  rng = np.random.default_rng(0)
  params = {"w1": rng.standard_normal((4, 6)).astype(np.float32),
            "w2": rng.standard_normal((6, 2)).astype(np.float32)}

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"])
    return jnp.concatenate([h[:, :3], h[:, 3:] * 2], axis=-1) @ p["w2"]

  x = np.ones((3, 4), np.float32)
  spec = trace.permutation_spec(fn, params, x)
  assert _as_sets(spec) == {
      (3, frozenset([AxisRef(("w1",), 1, None, (0, 3)), AxisRef(("w2",), 0, None, (0, 3))])),
      (3, frozenset([AxisRef(("w1",), 1, None, (3, 6)), AxisRef(("w2",), 0, None, (3, 6))])),
  }
  _assert_invariant(fn, params, spec, x)


def test_unknown_primitive_fixes_its_axes_and_is_named():
  rng = np.random.default_rng(0)
  params = {"w1": rng.standard_normal((4, 6)).astype(np.float32),
            "w2": rng.standard_normal((6, 2)).astype(np.float32)}

  def fn(p, x):
    return jnp.fft.fft(x @ p["w1"]).real @ p["w2"]

  with pytest.warns(UserWarning, match=r"unknown primitives \['fft'\]"):
    spec = trace.permutation_spec(fn, params, np.ones((3, 4), np.float32))
  assert not spec.groups


def test_scan_joins_its_carry_across_the_loop():
  """The carry's axes are one group with every layer's (tests/test_stacked.py: per-layer groups)."""
  rng = np.random.default_rng(0)
  params = {"embed": rng.standard_normal((4, 6)).astype(np.float32),
            "layers": rng.standard_normal((3, 6, 6)).astype(np.float32) / 3,
            "w": rng.standard_normal((6, 5)).astype(np.float32),
            "out": rng.standard_normal((5, 2)).astype(np.float32)}

  def fn(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["embed"], p["layers"])
    return jnp.tanh(h @ p["w"]) @ p["out"]

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spec = trace.permutation_spec(fn, params, np.ones((3, 4), np.float32))
  assert _as_sets(spec) == {
      (6, frozenset([AxisRef(("embed",), 1), AxisRef(("layers",), 1), AxisRef(("layers",), 2),
                     AxisRef(("w",), 0)])),
      (5, frozenset([AxisRef(("w",), 1), AxisRef(("out",), 0)]))}
  _assert_invariant(fn, params, spec, np.ones((3, 4), np.float32))


def test_jit_and_remat_inside_are_interpreted_per_call_site():
  rng = np.random.default_rng(0)
  params = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("a", "b", "c")}

  @jax.jit
  def layer(h, w):
    return jnp.tanh(h @ w)

  def fn(p, x):
    h = jax.checkpoint(layer)(layer(x, p["a"]), p["b"])
    return h @ p["c"]

  spec = trace.permutation_spec(fn, params, np.ones((3, 4), np.float32))
  assert _as_sets(spec) == {
      (4, frozenset([AxisRef(("a",), 1), AxisRef(("b",), 0)])),
      (4, frozenset([AxisRef(("b",), 1), AxisRef(("c",), 0)])),
  }


def test_capture_returns_each_kernels_input():
  config, input_shape = SMALL["mlp"]
  model = models.build("mlp", **config)
  variables, x = _init(model, input_shape, batch=3)
  out, feats = jax.jit(trace.capture(model.apply))(variables, x)
  np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-6)
  p = variables["params"]
  hidden_0 = np.maximum(x.reshape(3, -1) @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"], 0)
  assert set(feats) == {("params", n, "kernel") for n in ("hidden_0", "hidden_1", "head")}
  np.testing.assert_allclose(feats[("params", "hidden_0", "kernel")], x.reshape(3, -1), rtol=1e-6)
  np.testing.assert_allclose(feats[("params", "hidden_1", "kernel")], hidden_0, rtol=1e-5, atol=1e-6)


def test_capture_of_a_shared_kernel_is_a_tuple_in_call_order():
  w = np.eye(3, dtype=np.float32) * 2

  def fn(p, x):
    return (x @ p["w"]) @ p["w"]

  x = np.ones((1, 3), np.float32)
  _, feats = trace.capture(fn)({"w": w}, x)
  first, second = feats[("w",)]
  np.testing.assert_array_equal(first, x)
  np.testing.assert_array_equal(second, 2 * x)


def test_probe_gradients_are_the_cotangents_at_each_kernel_use():
  rng = np.random.default_rng(0)
  w1, w2 = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
  x = rng.standard_normal((5, 4)).astype(np.float32)
  x[0] = 0  # relu's input exactly 0: its custom derivative (0 there) must hold

  def fn(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"] + jnp.sum(p["w2"])

  probed = trace.probed_kernel_uses(fn)
  variables = {"w1": w1, "w2": w2}
  probes = {("w1",): [np.zeros((5, 3), np.float32)]}
  out_bar = rng.standard_normal((5, 2)).astype(np.float32)
  out, pullback = jax.vjp(lambda v, pr: probed(v, pr, x)[0], variables, probes)
  np.testing.assert_allclose(out, fn(variables, x), rtol=1e-6)
  grads, probe_grads = pullback(out_bar)
  want = jax.vjp(fn, variables, x)[1](out_bar)[0]
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), grads, want)
  hidden_bar = jax.vjp(lambda h: jax.nn.relu(h) @ w2, x @ w1)[1](out_bar)[0]
  np.testing.assert_allclose(probe_grads[("w1",)][0], hidden_bar, rtol=1e-5, atol=1e-6)
  _, uses, other_reads = probed(variables, probes, x)
  assert set(uses) == {("w1",), ("w2",)} and other_reads == {("w2",)}


def test_linen_module_with_submodule_sharing_is_sound():
  class Tied(nn.Module):

    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(6)
      h = jnp.tanh(dense(nn.Dense(6)(x)))
      return nn.Dense(2)(jnp.tanh(dense(h)))

  model = Tied()
  x = np.ones((2, 6), np.float32)
  variables = model.init(jax.random.key(0), x)
  spec = trace.permutation_spec(model.apply, variables, x)
  _assert_invariant(model.apply, variables, spec, x)


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_any_permutation_from_the_traced_spec_preserves_the_transformer(seed):
  params = _transformer_params(seed=seed % 7)
  x = np.random.default_rng(seed).standard_normal((2, 5, DIN)).astype(np.float32)
  spec = trace.permutation_spec(_transformer, params, x)
  _assert_invariant(_transformer, params, spec, x, seed=seed)
