"""Batched groups: stacked copies (scanned layers) with one permutation per copy.

The data model (AxisRef.batch, PermutationSpec.batch_sizes, checks, JSON),
permutations of shape [L, n] against a NumPy loop over the copies, the
stacked <-> unrolled mapping (mergejax.stacked), the tracer's reading of
`scan` (plain lax.scan, flax.linen nn.scan, NNX), and the zoo LM scanned vs
unrolled: specs that correspond group for group, a permutation that is the
same function on both, weight matching that reaches the same objective,
`combine` that is the unrolled combine stacked, and PLeaS (its ratio tied
across a batched group's copies, least squares per copy) that computes the
same merged function as PLeaS on the unrolled pair with the same ratios.
"""

import functools
import json
import math
import warnings

import flax.linen as nn
from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax import permute
from mergejax import stacked
from mergejax import trace
from mergejax import tree
from mergejax.models import lm
from mergejax.spec import AxisRef, PermutationSpec, check_spec, load_spec, save_spec
from mergejax.spec import permutation_from_json, permutation_to_json

L, D, F = 3, 6, 4  # copies, stream width, per-copy hidden width


def _weights(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) / math.sqrt(s[-2] if len(s) > 1 else 1)).astype(np.float32)
          for k, s in shapes.items()}


def _stack_spec():
  """A stack of L blocks `h + relu(h @ up[l] + b[l]) @ down[l]`, fused q|k parts on `qk`."""
  return PermutationSpec(
      {"stream": [AxisRef(("up",), 1), AxisRef(("down",), 2), AxisRef(("qk",), 1)],
       "hidden": [AxisRef(("up",), 2, batch=0), AxisRef(("b",), 1, batch=0), AxisRef(("down",), 1, batch=0)],
       "q": [AxisRef(("qk",), 2, ((2, 2), 0), (0, 4), batch=0)],
       "k": [AxisRef(("qk",), 2, ((2, 2), 0), (4, 8), batch=0)]},
      {"stream": D, "hidden": F, "q": 2, "k": 2}, {"hidden": L, "q": L, "k": L})


def _stack_vars(seed=0):
  return _weights({"up": (L, D, F), "b": (L, F), "down": (L, F, D), "qk": (L, D, 8)}, seed)


# The data model.


def test_batched_refs_and_sizes_are_checked():
  ref = AxisRef(("w",), 1, batch=0)
  assert ref.batch == 0 and AxisRef(("w",), 1).batch is None
  with pytest.raises(ValueError, match="w axis 1: batch must be a non-negative int other than the axis"):
    PermutationSpec({"h": [(("w",), 1, None, None, 1)]}, {"h": 2}, {"h": 3})
  with pytest.raises(ValueError, match="group 'h' is a batched group, but w axis 1 has no batch axis"):
    PermutationSpec({"h": [AxisRef(("w",), 1)]}, {"h": 2}, {"h": 3})
  with pytest.raises(ValueError, match=r"group 'h' is an ordinary group \(no batch size\), but w axis 1 "
                                       r"\(copies on axis 0\) has a batch axis"):
    PermutationSpec({"h": [ref]}, {"h": 2})
  with pytest.raises(ValueError, match=r"batch_sizes names groups the spec does not have: \['g'\]"):
    PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 3, "g": 3})
  with pytest.raises(ValueError, match="group 'h': batch size must be a positive int"):
    PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 0})
  a = PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 3})
  assert a == PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 3}) and hash(a) == hash(
      PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 3}))
  assert a != PermutationSpec({"h": [ref]}, {"h": 2}, {"h": 4})


def test_check_spec_refuses_what_does_not_fit_the_copies():
  v = _stack_vars()
  check_spec(_stack_spec(), v)
  bad = [
      (PermutationSpec({"h": [AxisRef(("up",), 2, batch=0)]}, {"h": F}, {"h": L + 1}),
       r"up axis 2 \(copies on axis 0\): 3 copies, group 'h' has 4"),
      (PermutationSpec({"h": [AxisRef(("b",), 1, batch=2)]}, {"h": F}, {"h": L}),
       "group 'h': b axis 1 .copies on axis 2.: batch axis out of range"),
      (PermutationSpec({"h": [AxisRef(("up",), 2, batch=0)], "g": [AxisRef(("up",), 0)]},
                       {"h": F, "g": L}, {"h": L}),
       "up axis 0 indexes the copies of group 'h' and is permuted by group 'g'"),
  ]
  for spec, message in bad:
    with pytest.raises(ValueError, match=message):
      check_spec(spec, v)


def test_batched_specs_and_permutations_round_trip_through_json(tmp_path):
  spec = _stack_spec()
  data = spec.to_json()
  assert data["batch_sizes"] == {"hidden": L, "q": L, "k": L}
  assert data["groups"]["q"][0] == [["qk"], 2, [[2, 2], 0], [0, 4], 0]
  assert data["groups"]["hidden"][0] == [["up"], 2, None, None, 0]
  assert "batch_sizes" not in PermutationSpec({"h": [AxisRef(("w",), 1)]}, {"h": 2}).to_json()
  save_spec(tmp_path / "spec.json", spec)
  assert load_spec(tmp_path / "spec.json") == spec
  rng = np.random.default_rng(0)
  perm = {g: np.stack([rng.permutation(n) for _ in range(L)]) if g in spec.batch_sizes else rng.permutation(n)
          for g, n in spec.sizes.items()}
  back = permutation_from_json(json.loads(json.dumps(permutation_to_json(perm))))
  assert back["hidden"].shape == (L, F) and back["hidden"].dtype == np.int32
  for g in perm:
    np.testing.assert_array_equal(back[g], perm[g])


# Permutations of shape [L, n].


def _numpy_apply(spec, perm, variables):
  """Copy by copy, each copy's ref permuted by its row, as plain NumPy gathers."""
  out = {k: np.array(v) for k, v in variables.items()}
  for g, refs in spec.groups.items():
    for r in refs:
      x, p = out[r.path[0]], np.asarray(perm[g])
      rows = p if r.batch is not None else np.broadcast_to(p, (1,) + p.shape)
      copies = [np.take(x, i, r.batch) for i in range(x.shape[r.batch])] if r.batch is not None else [x]
      axis = r.axis - (r.batch is not None and r.axis > r.batch)
      done = []
      for c, row in zip(copies, rows):
        start, stop = r.part or (0, c.shape[axis])
        inner = np.take(c, np.arange(start, stop), axis)
        view = r.factor[0] if r.factor else (stop - start,)
        k = r.factor[1] if r.factor else 0
        shaped = inner.reshape(inner.shape[:axis] + tuple(view) + inner.shape[axis + 1:])
        inner = np.take(shaped, row, axis + k).reshape(inner.shape)
        c = np.concatenate([np.take(c, np.arange(start), axis), inner,
                            np.take(c, np.arange(stop, c.shape[axis]), axis)], axis)
        done.append(c)
      out[r.path[0]] = np.stack(done, r.batch) if r.batch is not None else done[0]
  return out


def test_a_batched_permutation_permutes_each_copy_by_its_row():
  spec, v = _stack_spec(), _stack_vars()
  perm = permute.random_permutation(spec, jax.random.key(3))
  assert perm["hidden"].shape == (L, F) and perm["stream"].shape == (D,)
  assert len({tuple(row) for row in np.asarray(perm["hidden"])}) > 1  # the copies differ
  got = permute.apply_permutation(spec, perm, v)
  want = _numpy_apply(spec, perm, v)
  for k in v:
    np.testing.assert_array_equal(got[k], want[k])
    assert isinstance(got[k], np.ndarray)  # NumPy leaves stay NumPy
  jitted = jax.jit(permute.apply_permutation, static_argnums=0)(spec, perm, v)
  for k in v:
    np.testing.assert_array_equal(jitted[k], want[k])


def test_invert_compose_and_identity_act_row_by_row():
  spec, v = _stack_spec(), _stack_vars()
  p = permute.random_permutation(spec, jax.random.key(0))
  q = permute.random_permutation(spec, jax.random.key(1))
  apply = functools.partial(permute.apply_permutation, spec)
  both = apply(permute.compose_permutations(p, q), v)
  for k, x in apply(q, apply(p, v)).items():
    np.testing.assert_array_equal(both[k], x)
  for k, x in apply(permute.invert_permutation(p), apply(p, v)).items():
    np.testing.assert_array_equal(x, v[k])
  ident = permute.identity_permutation(spec)
  assert ident["hidden"].shape == (L, F)
  for k, x in apply(ident, v).items():
    np.testing.assert_array_equal(x, v[k])


def test_check_permutation_wants_one_row_per_copy():
  spec = _stack_spec()
  perm = dict(permute.identity_permutation(spec))
  with pytest.raises(ValueError, match=r"group 'hidden': expected int\[3, 4\], got int32\[4\]"):
    permute.check_permutation(spec, {**perm, "hidden": np.arange(F, dtype=np.int32)})
  rows = np.tile(np.arange(F), (L, 1))
  rows[1] = [0, 0, 1, 2]
  with pytest.raises(ValueError, match=r"group 'hidden' is not a permutation of range\(4\) in every row"):
    permute.check_permutation(spec, {**perm, "hidden": rows})


# The stacked <-> unrolled mapping.


def test_unstack_cuts_stacked_leaves_into_copies_and_stack_undoes_it():
  spec, v = _stack_spec(), _stack_vars()
  flat_spec, flat = stacked.unstack(spec, v)
  assert not flat_spec.batch_sizes
  assert flat_spec.names == ("stream", "hidden[0]", "q[0]", "k[0]", "hidden[1]", "q[1]", "k[1]",
                             "hidden[2]", "q[2]", "k[2]")
  assert isinstance(flat["up"], list) and len(flat["up"]) == L
  np.testing.assert_array_equal(flat["down"][2], v["down"][2])
  assert set(flat_spec.groups["hidden[1]"]) == {AxisRef(("up", "1"), 1), AxisRef(("b", "1"), 0),
                                                 AxisRef(("down", "1"), 0)}
  assert AxisRef(("down", "2"), 1) in flat_spec.groups["stream"]  # an ordinary ref: one per copy
  check_spec(flat_spec, flat)
  back = stacked.stack(spec, flat)
  for k in v:
    np.testing.assert_array_equal(back[k], v[k])
  perm = permute.random_permutation(spec, jax.random.key(0))
  flat_perm = stacked.unstack_permutation(spec, perm)
  assert list(flat_perm) == list(flat_spec.names)
  np.testing.assert_array_equal(flat_perm["q[2]"], perm["q"][2])
  again = stacked.stack_permutation(spec, flat_perm)
  for g in perm:
    np.testing.assert_array_equal(again[g], perm[g])


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_permuting_stacked_then_unstacking_is_unstacking_then_permuting_the_copies(seed):
  spec, v = _stack_spec(), _stack_vars(seed % 7)
  perm = permute.random_permutation(spec, jax.random.key(seed))
  flat_spec, flat = stacked.unstack(spec, v)
  one = stacked.unstack(spec, permute.apply_permutation(spec, perm, v))[1]
  two = permute.apply_permutation(flat_spec, stacked.unstack_permutation(spec, perm), flat)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_array_equal(a, b)


def test_the_mapping_names_what_does_not_fit():
  spec, v = _stack_spec(), _stack_vars()
  clash = PermutationSpec({**spec.groups, "hidden[0]": [AxisRef(("extra",), 0)]},
                          {**spec.sizes, "hidden[0]": F}, spec.batch_sizes)
  with pytest.raises(ValueError, match="copy 0 of group 'hidden' would be named 'hidden\\[0\\]'"):
    stacked.unstack(clash, {**v, "extra": np.ones(F, np.float32)})
  with pytest.raises(ValueError, match="up has copies on axis 0 and on axis 1"):
    stacked.unstack(spec, v, stacked={"up": 1})
  with pytest.raises(ValueError, match="unstack: no variable nope"):
    stacked.unstack(spec, v, stacked={"nope": 0})
  ordinary = PermutationSpec({"layers": [AxisRef(("b",), 0)]}, {"layers": L})
  with pytest.raises(ValueError, match="group 'layers' permutes axis 0 of b, its copies' axis"):
    stacked.unstack(ordinary, v, stacked={"b": 0})
  flat = stacked.unstack(spec, v)[1]
  with pytest.raises(ValueError, match="stack: qk is not a list of copies"):
    stacked.stack(spec, {**flat, "qk": v["qk"]})
  with pytest.raises(ValueError, match="stack: no copies of qk"):
    stacked.stack(spec, {k: x for k, x in flat.items() if k != "qk"})
  with pytest.raises(ValueError, match=r"stack_permutation: missing \['hidden\[2\]'\]"):
    stacked.stack_permutation(spec, {g: p for g, p in stacked.unstack_permutation(
        spec, permute.identity_permutation(spec)).items() if g != "hidden[2]"})


# The tracer on scan.


def _traced(fn, variables, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return trace.permutation_spec(fn, variables, *args)


def _sets(spec):
  return {(spec.sizes[g], spec.batch_sizes.get(g), frozenset(refs)) for g, refs in spec.groups.items()}


def _assert_invariant(fn, variables, spec, *args, seed=0):
  perm = permute.random_permutation(spec, jax.random.key(seed))
  permuted = permute.apply_permutation(spec, perm, variables)
  for a, b in zip(jax.tree.leaves(jax.jit(fn)(variables, *args)), jax.tree.leaves(jax.jit(fn)(permuted, *args))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(permuted)))


def _jnp_stack(p, x, reverse=False):
  def body(h, w):
    up, b, down = w
    return h + jax.nn.relu(h @ up + b) @ down, None

  h, _ = jax.lax.scan(body, x @ p["embed"], (p["up"], p["b"], p["down"]), reverse=reverse, unroll=2)
  return h @ p["out"]


_JNP = {"embed": (5, D), "up": (L, D, F), "b": (L, F), "down": (L, F, D), "out": (D, 2)}


@pytest.mark.parametrize("reverse", [False, True])
def test_lax_scan_gives_the_carry_one_group_and_each_copy_its_own(reverse):
  params, x = _weights(_JNP), np.ones((2, 5), np.float32)
  fn = functools.partial(_jnp_stack, reverse=reverse)
  spec = _traced(fn, params, x)
  assert _sets(spec) == {
      (D, None, frozenset([AxisRef(("embed",), 1), AxisRef(("up",), 1), AxisRef(("down",), 2),
                           AxisRef(("out",), 0)])),
      (F, L, frozenset([AxisRef(("up",), 2, batch=0), AxisRef(("b",), 1, batch=0),
                        AxisRef(("down",), 1, batch=0)]))}
  _assert_invariant(fn, params, spec, x)


def test_scanned_copies_read_elsewhere_or_carried_out_share_one_permutation():
  params, x = _weights(_JNP), np.ones((2, 5), np.float32)

  def read_outside(p, x):
    return _jnp_stack(p, x) + jnp.sum(p["b"]) * 0.0 + p["up"].max()

  report = trace.spec_report(read_outside, params, x)
  assert report.shared == {"read outside the loop": (("b",), ("up",))}
  assert not report.spec.batch_sizes
  assert (F, None, frozenset([AxisRef(("up",), 2), AxisRef(("b",), 1), AxisRef(("down",), 1)])) in _sets(
      report.spec)
  _assert_invariant(read_outside, params, report.spec, x)

  def ys_out(p, x):
    def body(h, w):
      up, b, down = w
      z = jax.nn.relu(h @ up + b)
      return h + z @ down, z
    h, zs = jax.lax.scan(body, x @ p["embed"], (p["up"], p["b"], p["down"]))
    return h @ p["out"] + jnp.max(zs.sum(0), -1, keepdims=True)  # max over units of a sum over copies

  with pytest.warns(UserWarning, match=r"scan: the copies of b, down, up share one permutation \(carried out"
                                       r" of the loop by ys\)"):
    spec = trace.permutation_spec(ys_out, params, x)
  assert not spec.batch_sizes
  _assert_invariant(ys_out, params, spec, x)


def test_consts_of_a_scan_stay_ordinary_and_nested_scans_batch_their_own_copies():
  params = _weights({"shared": (D, D), "layers": (L, D, F), "back": (L, F, D)})
  x = np.ones((2, D), np.float32)

  def fn(p, x):
    def step(h, _):  # an outer loop over time whose body runs the stack as a const
      def layer(g, w):
        return g + jnp.tanh(g @ w[0]) @ w[1], None
      g, _ = jax.lax.scan(layer, jnp.tanh(h @ p["shared"]), (p["layers"], p["back"]))
      return g, None
    h, _ = jax.lax.scan(step, x, None, length=2)
    return h

  spec = trace.spec_report(fn, params, x).spec
  assert _sets(spec) == {(F, L, frozenset([AxisRef(("layers",), 2, batch=0), AxisRef(("back",), 1, batch=0)]))}
  _assert_invariant(fn, params, spec, x)


def test_a_const_split_inside_the_body_keeps_one_permutation_for_all_copies():
  """The pieces of a const's axis, cut in the body, are the const's: never per copy."""
  params = _weights({"in": (5, D), "wc": (D, 6), "s": (L, 3, F), "back": (F, D)})
  x = np.ones((2, 5), np.float32)

  def fn(p, x):
    def layer(g, s):
      a = (g @ p["wc"]).reshape(g.shape[0], 2, 3)
      return g + jnp.tanh(jnp.einsum("bhk,kf->bf", a, s)) @ p["back"], None
    return jax.lax.scan(layer, x @ p["in"], p["s"])[0]

  spec = _traced(fn, params, x)
  assert _sets(spec) == {
      (2, None, frozenset([AxisRef(("wc",), 1, ((2, 3), 0))])),
      (3, None, frozenset([AxisRef(("wc",), 1, ((2, 3), 1)), AxisRef(("s",), 1)])),
      (F, None, frozenset([AxisRef(("s",), 2), AxisRef(("back",), 0)]))}
  _assert_invariant(fn, params, spec, x)


def test_flax_linen_nn_scan_mlp_stack():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      up, down = nn.Dense(F, name="up"), nn.Dense(D, name="down")
      return h + down(nn.relu(up(h))), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(D, name="embed")(x)
      h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(name="stack")(h, None)
      return nn.Dense(2, name="head")(h)

  x = np.ones((2, 5), np.float32)
  shapes = jax.eval_shape(Net().init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) / 2, shapes)
  spec = _traced(Net().apply, variables, x)
  p = lambda *k: ("params", *k)  # noqa: E731
  assert _sets(spec) == {
      (D, None, frozenset([AxisRef(p("embed", "kernel"), 1), AxisRef(p("embed", "bias"), 0),
                           AxisRef(p("stack", "up", "kernel"), 1), AxisRef(p("stack", "down", "kernel"), 2),
                           AxisRef(p("stack", "down", "bias"), 1), AxisRef(p("head", "kernel"), 0)])),
      (F, L, frozenset([AxisRef(p("stack", "up", "kernel"), 2, batch=0), AxisRef(p("stack", "up", "bias"), 1, batch=0),
                        AxisRef(p("stack", "down", "kernel"), 1, batch=0)]))}
  _assert_invariant(Net().apply, variables, spec, x)


def test_nnx_layers_stacked_on_a_leading_axis_and_run_by_scan():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.up, self.down = nnx.Linear(D, F, rngs=rngs), nnx.Linear(F, D, rngs=rngs)

    def __call__(self, h):
      return h + self.down(nnx.relu(self.up(h)))

  # One block's graph; its state stacked L times on a leading axis, as
  # `nnx.vmap` over the constructor gives it (built from shapes: nothing runs).
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Block(nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: rng.standard_normal((L, *s.shape)).astype(np.float32) / 2, shapes)

  def fn(state, x):
    def body(h, s):
      return nnx.merge(graphdef, s)(h), None
    return jax.lax.scan(body, x, state)[0]

  x = np.ones((2, D), np.float32)
  spec = _traced(fn, state, x)
  assert _sets(spec) == {(F, L, frozenset([AxisRef(("up", "kernel", "value"), 2, batch=0),
                                            AxisRef(("up", "bias", "value"), 1, batch=0),
                                            AxisRef(("down", "kernel", "value"), 1, batch=0)]))}
  _assert_invariant(fn, state, spec, x)


# The zoo LM, scanned vs unrolled.


SMALL = dict(embed_dim=8, depth=2, num_heads=4, head_dim=4, max_len=8, mlp_dim=12)
STYLES = {"gpt2": dict(style="gpt2", **SMALL), "llama": dict(style="llama", **SMALL)}
IDS = np.random.default_rng(0).integers(0, 256, (2, 6)).astype(np.int32)


@functools.cache
def _lm(style, scan, seed=1):
  cfg = dict(STYLES[style], scan=scan)
  model = models.build("lm", **cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), IDS)
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return cfg, jax.jit(model.apply), variables


def _unrolled_name(name):
  """`blocks.X[l]` -> `block{l}.X`."""
  if not name.startswith("blocks."):
    return name
  base, copy = name[len("blocks."):].split("[")
  return f"block{copy[:-1]}.{base}"


def _unrolled_path(path):
  """`params/blocks/X/l` -> `params/block{l}/X`."""
  return (path[0], f"block{path[-1]}", *path[2:-1]) if path[1] == "blocks" else path


def _flat(spec, variables):
  """The scanned model's spec and variables, every leaf under blocks cut into layers."""
  return stacked.unstack(spec, variables, stacked={p: 0 for p in tree.leaves_by_path(variables)
                                                   if p[1] == "blocks"})


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_scanned_lm_hand_spec_is_the_traced_one_and_the_unrolled_one_stacked(style):
  cfg, apply, variables = _lm(style, True)
  hand = models.permutation_spec("lm", variables, **cfg)
  traced = _traced(apply, variables, IDS)
  assert _sets(hand) == _sets(traced)
  assert set(hand.batch_sizes) == set(hand.names) - {"embed"} and set(hand.batch_sizes.values()) == {2}
  flat_spec, _ = _flat(hand, variables)
  ucfg, _, uvars = _lm(style, False)
  unrolled = models.permutation_spec("lm", uvars, **ucfg)
  assert [_unrolled_name(g) for g in flat_spec.names] == list(unrolled.names)  # group for group, in order
  renamed = PermutationSpec({_unrolled_name(g): [r._replace(path=_unrolled_path(r.path)) for r in refs]
                             for g, refs in flat_spec.groups.items()},
                            {_unrolled_name(g): n for g, n in flat_spec.sizes.items()})
  assert renamed == unrolled


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_a_permutation_of_the_scanned_lm_is_its_image_on_the_unrolled_one(style):
  cfg, apply, variables = _lm(style, True)
  spec = models.permutation_spec("lm", variables, **cfg)
  perm = permute.random_permutation(spec, jax.random.key(2))
  permuted = permute.apply_permutation(spec, perm, variables)
  np.testing.assert_allclose(apply(permuted, IDS), apply(variables, IDS), rtol=1e-4, atol=1e-4)
  ucfg, _, _ = _lm(style, False)
  uvars = lm.unstack_layers(variables)
  unrolled = models.permutation_spec("lm", uvars, **ucfg)
  image = {_unrolled_name(g): p for g, p in stacked.unstack_permutation(spec, perm).items()}
  upermuted = permute.apply_permutation(unrolled, image, uvars)
  # The same variables, so the same function (tests/test_lm.py: the scanned model computes the unrolled one).
  for a, b in zip(jax.tree.leaves(lm.stack_layers(upermuted)), jax.tree.leaves(permuted)):
    np.testing.assert_array_equal(a, b)


def test_weight_matching_the_scanned_lm_reaches_the_unrolled_objective():
  cfg, _, va = _lm("llama", True, seed=1)
  _, _, vb = _lm("llama", True, seed=2)
  spec = models.permutation_spec("lm", va, **cfg)
  res = mj.weight_matching(spec, va, vb, key=jax.random.key(0))
  assert res.perm["blocks.mlp"].shape == (2, 12) and res.pair_scores["blocks.mlp"].shape == (2, 12)
  ucfg, _, _ = _lm("llama", False)
  ua, ub = lm.unstack_layers(va), lm.unstack_layers(vb)
  unrolled = models.permutation_spec("lm", ua, **ucfg)
  ures = mj.weight_matching(unrolled, ua, ub, key=jax.random.key(0))
  np.testing.assert_allclose(res.objective_trace[-1], ures.objective_trace[-1], rtol=1e-4)
  aligned = permute.apply_permutation(spec, res.perm, vb)
  assert float(tree.vdot(va, aligned)) == pytest.approx(float(res.objective_trace[-1]), rel=1e-4)
  assert float(tree.vdot(va, aligned)) > float(tree.vdot(va, vb))


def test_capture_unrolls_scans_over_variables_into_per_copy_kernels():
  params, x = _weights(_JNP), np.ones((2, 5), np.float32)
  out, feats = jax.jit(trace.capture(_jnp_stack, unroll_scans=True))(params, x)
  h = x @ params["embed"]
  for i in range(L):  # NumPy, layer by layer
    np.testing.assert_allclose(feats[("up", str(i))], h, rtol=1e-5, atol=1e-5)
    z = np.maximum(h @ params["up"][i] + params["b"][i], 0)
    np.testing.assert_allclose(feats[("down", str(i))], z, rtol=1e-5, atol=1e-5)
    h = h + z @ params["down"][i]
  np.testing.assert_allclose(out, h @ params["out"], rtol=1e-5, atol=1e-5)
  assert set(trace.capture(_jnp_stack)(params, x)[1]) == {("embed",), ("out",)}  # a scan is one operation


def _jnp_unrolled(p, x):
  """`_jnp_stack` with its layers as separate variables: `p["up"]` a list of L kernels."""
  h = x @ p["embed"]
  for up, b, down in zip(p["up"], p["b"], p["down"]):
    h = h + jax.nn.relu(h @ up + b) @ down
  return h @ p["out"]


def test_the_scanned_stack_traces_and_matches_as_its_unrolled_twin():
  """The jnp stack scanned and unrolled, traced apart: the same groups and the same matchings."""
  pa, pb = _weights(_JNP, 1), _weights(_JNP, 2)
  x = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
  spec = _traced(_jnp_stack, pa, x)
  flat_spec, fa = stacked.unstack(spec, pa)
  fb = stacked.unstack(spec, pb)[1]
  unrolled = _traced(_jnp_unrolled, fa, x)
  assert _sets(unrolled) == _sets(flat_spec)
  name = {frozenset(refs): g for g, refs in flat_spec.groups.items()}
  hidden = next(g for g in spec.groups if g in spec.batch_sizes)
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  activation = mj.activation_matching(spec, _jnp_stack, pa, pb, [x], mesh=mesh, progress=False)
  twin = mj.activation_matching(unrolled, _jnp_unrolled, fa, fb, [x], mesh=mesh, progress=False)
  twin_perm = stacked.stack_permutation(spec, {name[frozenset(unrolled.groups[g])]: p for g, p in twin.perm.items()})
  weight = mj.weight_matching(spec, pa, pb, key=jax.random.key(0))
  flat = mj.weight_matching(flat_spec, fa, fb, key=jax.random.key(0))
  for res, other, perm in ((activation, twin, twin_perm),
                           (weight, flat, stacked.stack_permutation(spec, flat.perm))):
    assert res.perm[hidden].shape == res.pair_scores[hidden].shape == (L, F)
    np.testing.assert_allclose(res.objective_trace[-1], other.objective_trace[-1], rtol=1e-4)
    for g in spec.groups:
      np.testing.assert_array_equal(res.perm[g], perm[g])


def test_ste_matching_does_not_take_batched_groups_and_says_so_before_any_work():
  cfg, _, va = _lm("gpt2", True)
  spec = models.permutation_spec("lm", va, **cfg)
  with pytest.raises(NotImplementedError, match=r"ste_matching does not take batched groups .*"
                                                r"\['blocks.heads', 'blocks.mlp'"):
    mj.ste_matching(spec, lambda v: 0.0, va, va, [IDS], num_steps=1)


# Merges to a new width: combine and PLeaS, scanned vs unrolled.


def _unrolled_layout(layout, depth):
  """A scanned LM's layout (`blocks.X`: one GroupLayout for every layer) as the unrolled LM's `block{l}.X`."""
  out = {}
  for g, v in layout.items():
    out.update({f"block{i}.{g[len('blocks.'):]}": v for i in range(depth)} if g.startswith("blocks.") else {g: v})
  return mj.MergeLayout(out)


def _random_maps(spec, rng):
  """A UnitMap per group, a batched group's a different one per copy, all of one width (head_dim and the
  queries per kv head merged fully, as the zoo wants them)."""
  maps = {}
  for g, n in spec.sizes.items():
    m = n if g.endswith(("qk_dim", "vo_dim", "q_per_kv")) else int(rng.integers(0, n + 1))
    copies = [mj.merge.combine.partial_map(rng.permutation(n) < m) for _ in range(spec.batch_sizes.get(g, 1))]
    maps[g] = copies if g in spec.batch_sizes else copies[0]
  return maps


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_combine_of_the_scanned_lm_is_the_unrolled_combine_stacked(style):
  cfg, apply, va = _lm(style, True, seed=1)
  _, _, vb = _lm(style, True, seed=2)
  spec = models.permutation_spec("lm", va, **cfg)
  maps = _random_maps(spec, np.random.default_rng(0))
  copies = {k.path: frozenset(k.plan.in_axes)
            for k in mj.merge.kernels.model_kernels(apply, va, IDS, unroll_scans=True)}
  assert ("params", "blocks", "mlp_down", "kernel", "1") in copies  # a stacked kernel's copies
  whole = {}  # the same axes keyed by the stacked kernel (one axis later)
  for path, axes in copies.items():
    if path[1] == "blocks":
      whole[path[:-1]] = frozenset(a + 1 for a in axes)
    else:
      whole[path] = axes
  merged = mj.merge.combine.combine(spec, maps, va, vb, inputs=copies)
  # The oracle: the unrolled model's spec, variables and kernels, combined as an ordinary model.
  ucfg, uapply, _ = _lm(style, False)
  ua, ub = lm.unstack_layers(va), lm.unstack_layers(vb)
  uspec = models.permutation_spec("lm", ua, **ucfg)
  umaps = {g: maps[g] for g in spec.groups if g not in spec.batch_sizes}
  umaps.update({f"block{i}.{g[len('blocks.'):]}": ms[i] for g, ms in maps.items() if g in spec.batch_sizes
                for i in range(len(ms))})
  uinputs = {k.path: frozenset(k.plan.in_axes) for k in mj.merge.kernels.model_kernels(uapply, ua, IDS)}
  expected = lm.stack_layers(mj.merge.combine.combine(uspec, umaps, ua, ub, inputs=uinputs))
  for other in (merged, mj.merge.combine.combine(spec, maps, va, vb, inputs=whole)):
    assert jax.tree.structure(other) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  layout = mj.merge.combine.layout_of(maps)
  assert _unrolled_layout(layout, cfg["depth"]) == mj.merge.combine.layout_of(umaps)
  # The merged variables are the scanned model built from the layout's (its names, as they are).
  shapes = jax.eval_shape(models.build("lm", layout, **cfg).init, jax.random.key(0), IDS)
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, merged)


def test_combine_merging_every_unit_of_every_copy_is_the_mean():
  spec, va, vb = _stack_spec(), _stack_vars(0), _stack_vars(1)
  maps = {g: mj.merge.combine.partial_map(np.ones(n, bool)) for g, n in spec.sizes.items()}
  merged = mj.merge.combine.combine(spec, maps, va, vb, inputs={("up",): frozenset({1}), ("down",): frozenset({1}),
                                                                ("qk",): frozenset({1})})
  for k in va:  # NumPy: (A + B) / 2, leaf by leaf
    np.testing.assert_allclose(merged[k], (va[k] + vb[k]) / 2, rtol=1e-6, atol=1e-6)


def test_combine_and_layout_of_refuse_copies_of_different_widths():
  spec, va = _stack_spec(), _stack_vars(0)
  maps = {g: mj.merge.combine.partial_map(np.ones(n, bool)) for g, n in spec.sizes.items()}
  maps["hidden"] = [mj.merge.combine.partial_map(np.arange(F) < m) for m in (F, F, F - 1)]
  with pytest.raises(ValueError, match=r"copies of group 'hidden' have \(units, width\) \[\(4, 4\), \(4, 5\)\]"):
    mj.merge.combine.layout_of(maps)
  with pytest.raises(ValueError, match="copies of group 'hidden'"):
    mj.merge.combine.combine(spec, maps, va, va)
  maps["hidden"] = maps["hidden"][:2]
  with pytest.raises(ValueError, match="batched group 'hidden' has 3 copies but 2 values"):
    mj.merge.combine.combine(spec, maps, va, va)
  with pytest.raises(ValueError, match=r"up: axis 0 is its copies' axis"):
    mj.merge.combine.combine(spec, dict(maps, hidden=mj.merge.combine.partial_map(np.ones(F, bool))), va, va,
                             inputs={("up",): frozenset({0})})


PLEAS_LM = dict(embed_dim=16, depth=2, num_heads=4, head_dim=4, max_len=8, mlp_dim=16)
PLEAS_IDS = np.random.default_rng(1).integers(0, 256, (4, 8)).astype(np.int32)
MESH = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # one device: less to compile


@functools.cache
def _pleas_lm(style, scan, seed):
  """(config, model, variables); the unrolled model's variables are the scanned one's unstacked."""
  cfg = dict(style=style, scan=scan, **PLEAS_LM)
  model = models.build("lm", **cfg)
  if not scan:
    return cfg, model, lm.unstack_layers(_pleas_lm(style, True, seed)[2])
  shapes = jax.eval_shape(model.init, jax.random.key(0), PLEAS_IDS)
  rng = np.random.default_rng(seed)
  return cfg, model, jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _pleas(style, scan, budget, fit, allocation, vb=None):
  cfg, model, va = _pleas_lm(style, scan, 1)
  vb = _pleas_lm(style, scan, 2)[2] if vb is None else vb
  spec = models.permutation_spec("lm", va, **cfg)
  return mj.merge.pleas(model.apply, va, vb, [PLEAS_IDS], budget=budget, spec=spec, allocation=allocation,
                        least_squares_fit=fit, mesh=MESH, progress=False, report=True)


@functools.cache
def _lm_apply(cfg_items, layout):
  """The LM built from `layout`, jitted once per config and layout (eager Flax runs op by op: slower)."""
  return jax.jit(models.build("lm", layout, **dict(cfg_items)).apply)


def _lm_out(cfg, layout, variables):
  return _lm_apply(tuple(sorted(cfg.items())), layout)(variables, PLEAS_IDS)


# Budgets 1.0 and 2.0 leave the allocation no choice; at 1.5 "uniform" gives every group one ratio, so the
# unrolled pair gets the ratios the scanned one ties across its layers. The least-squares cases are slow (a
# minute each on 2 cores, compiling every copy's solve); `make test` keeps the per-copy least squares through
# the self-merge below and the layouts, allocation and combine through the cases without it.
@pytest.mark.parametrize("style,budget,fit", [
    pytest.param("gpt2", 1.5, True, marks=pytest.mark.slow), pytest.param("llama", 1.5, True, marks=pytest.mark.slow),
    ("llama", 1.0, False), ("gpt2", 2.0, False), ("llama", 1.5, False)])
def test_pleas_on_the_scanned_lm_is_pleas_on_the_unrolled_lm(style, budget, fit):
  allocation = "uniform" if budget == 1.5 else "exact"
  merged, layout, report = _pleas(style, True, budget, fit, allocation)
  umerged, ulayout, ureport = _pleas(style, False, budget, fit, allocation)
  cfg, ucfg = _pleas_lm(style, True, 1)[0], _pleas_lm(style, False, 1)[0]
  assert _unrolled_layout(layout, cfg["depth"]) == ulayout
  assert set(layout) == set(models.permutation_spec("lm", _pleas_lm(style, True, 1)[2], **cfg).names)
  np.testing.assert_allclose(report.allocation.cost, ureport.allocation.cost, rtol=1e-9)
  assert len(report.layers) == len(ureport.layers) and (len(report.layers) > 0) == fit  # one solve per copy
  out = _lm_out(cfg, layout, merged)  # the scanned LM built from PLeaS's layout as it is
  _close(out, _lm_out(ucfg, ulayout, umerged), 1e-4)
  got, want = tree.leaves_by_path(merged), tree.leaves_by_path(lm.stack_layers(umerged))
  assert set(got) == set(want)
  for path, x in got.items():
    _close(x, want[path], 1e-4)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_pleas_ties_the_exact_allocation_across_the_scanned_layers():
  """The cost of a batched group is its copies' sum: the unrolled model's cost of the tied ratios."""
  merged, layout, report = _pleas("gpt2", True, 1.5, False, "exact")
  cfg, model, va = _pleas_lm("gpt2", True, 1)
  spec = models.permutation_spec("lm", va, **cfg)
  assert set(report.allocation.ratios) <= set(spec.names) and "blocks.mlp" in report.allocation.ratios
  ucfg, umodel, ua = _pleas_lm("gpt2", False, 1)
  uspec = models.permutation_spec("lm", ua, **ucfg)
  kernels = mj.merge.kernels.model_kernels(umodel.apply, ua, PLEAS_IDS)
  fixed = mj.merge.combine.fixed_groups(uspec, {k.path: frozenset(k.plan.in_axes) for k in kernels})
  terms = mj.merge.kernels.cost_terms(uspec, kernels, ua, {}, fixed, "flops")
  ratios = {g: report.allocation.ratios[g if g == "embed" else "blocks." + g.split(".", 1)[1]]
            for g in uspec.names if g not in fixed}
  unrolled_cost = mj.merge.budget.relative_cost(terms, ratios)
  assert report.allocation.cost == pytest.approx(unrolled_cost, rel=1e-9) and unrolled_cost <= 1.5 + 1e-9
  for g, (n_merged, _, _) in layout.items():  # one ratio, so one width, for every layer
    assert n_merged == mj.spec.round_half_up(report.allocation.ratios.get(g, 1.0) * spec.sizes[g])
  assert layout["embed"].n_a > 0 or layout["blocks.mlp"].n_a > 0  # something is kept at 1.5
  assert np.all(np.isfinite(_lm_out(cfg, layout, merged)))


def test_pleas_of_the_scanned_lm_with_a_permuted_copy_of_itself_at_budget_one_is_the_model():
  cfg, model, va = _pleas_lm("llama", True, 1)
  spec = models.permutation_spec("lm", va, **cfg)
  perm = permute.random_permutation(spec, jax.random.key(3))
  copy = permute.apply_permutation(spec, perm, va)
  assert not np.array_equal(perm["blocks.mlp"][0], perm["blocks.mlp"][1])  # each layer its own permutation
  merged, layout, _ = _pleas("llama", True, 1.0, True, "exact", vb=copy)
  assert layout == mj.MergeLayout.identity(spec.sizes)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(va)):
    _close(a, b, 1e-4)
  _close(_lm_out(cfg, None, merged), _lm_out(cfg, None, va), 1e-4)
