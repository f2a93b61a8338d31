"""Tests for mergejax.permute and the spec checks it relies on."""

import json
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import permute
from mergejax import tree as tree_lib
from mergejax.spec import AxisRef, PermutationSpec, check_spec
from mergejax.spec import permutation_from_json, permutation_to_json
from test_spec import specs_and_shapes


def _spec_and_tree():
  rng = np.random.default_rng(0)
  variables = {
      "w1": rng.standard_normal((3, 6)).astype(np.float32),
      "b1": rng.standard_normal(6).astype(np.float32),
      "qkv": rng.standard_normal((6, 2 * 4)).astype(np.float32),  # (embed, heads * head_dim)
      "labels": np.arange(5),
  }
  spec = PermutationSpec(
      {"h": [AxisRef(("w1",), 1), AxisRef(("b1",), 0), AxisRef(("qkv",), 0)],
       "heads": [AxisRef(("qkv",), 1, ((2, 4), 0))],
       "head_dim": [AxisRef(("qkv",), 1, ((2, 4), 1))]},
      {"h": 6, "heads": 2, "head_dim": 4})
  return spec, variables


def test_apply_matches_numpy_gathers_including_factored_axes():
  spec, v = _spec_and_tree()
  perm = permute.random_permutation(spec, jax.random.key(0))
  out = permute.apply_permutation(spec, perm, v)
  h, heads, hd = (np.asarray(perm[g]) for g in ("h", "heads", "head_dim"))
  np.testing.assert_array_equal(out["w1"], v["w1"][:, h])
  np.testing.assert_array_equal(out["b1"], v["b1"][h])
  qkv = v["qkv"][h].reshape(6, 2, 4)[:, heads][:, :, hd].reshape(6, 8)
  np.testing.assert_array_equal(out["qkv"], qkv)
  assert out["labels"] is v["labels"]  # untouched leaves are the same objects


@hypothesis.given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_invert_and_compose(seed_p, seed_q):
  spec, v = _spec_and_tree()
  p = permute.random_permutation(spec, jax.random.key(seed_p))
  q = permute.random_permutation(spec, jax.random.key(seed_q))
  back = permute.apply_permutation(spec, permute.invert_permutation(p), permute.apply_permutation(spec, p, v))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v)):
    np.testing.assert_array_equal(a, b)
  both = permute.apply_permutation(spec, permute.compose_permutations(p, q), v)
  twice = permute.apply_permutation(spec, q, permute.apply_permutation(spec, p, v))
  for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(twice)):
    np.testing.assert_array_equal(a, b)


def test_works_under_jit():
  spec, v = _spec_and_tree()
  perm = permute.random_permutation(spec, jax.random.key(1))
  jitted = jax.jit(lambda p, v: permute.apply_permutation(spec, p, v))(perm, v)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(permute.apply_permutation(spec, perm, v))):
    np.testing.assert_array_equal(a, b)


def test_bad_permutations_are_refused():
  spec, v = _spec_and_tree()
  perm = permute.identity_permutation(spec)
  with pytest.raises(ValueError, match=r"missing groups \['heads'\]"):
    permute.apply_permutation(spec, {k: p for k, p in perm.items() if k != "heads"}, v)
  with pytest.raises(ValueError, match="group 'h' is not a permutation"):
    permute.apply_permutation(spec, {**perm, "h": np.array([0, 0, 1, 2, 3, 4])}, v)
  with pytest.raises(ValueError, match=r"group 'h': expected int\[6\]"):
    permute.apply_permutation(spec, {**perm, "h": np.arange(5)}, v)


def test_check_spec_names_what_does_not_fit():
  spec, v = _spec_and_tree()
  check_spec(spec, v)
  with pytest.raises(ValueError, match="no variable w2"):
    check_spec(PermutationSpec({"h": [AxisRef(("w2",), 0)]}, {"h": 6}), v)
  with pytest.raises(ValueError, match="w1 axis 1: size 6, group 'h' has 5"):
    check_spec(PermutationSpec({"h": [AxisRef(("w1",), 1)]}, {"h": 5}), v)
  with pytest.raises(ValueError, match="w1 axis 1 is claimed by groups 'a' and 'b'"):
    check_spec(PermutationSpec({"a": [AxisRef(("w1",), 1)], "b": [AxisRef(("w1",), 1)]}, {"a": 6, "b": 6}), v)
  with pytest.raises(ValueError, match="does not view size 8"):
    check_spec(PermutationSpec({"a": [AxisRef(("qkv",), 1, ((3, 4), 0))]}, {"a": 3}), v)


def test_factors_are_canonical_and_json_round_trips():
  spec = PermutationSpec({"c": [AxisRef(("k",), 0, ((4, 4, 32), 2)), AxisRef(("b",), 0, ((1, 8), 1))]},
                         {"c": 32})
  assert spec.groups["c"][0].factor == ((16, 32), 1)
  assert spec.groups["c"][1].factor is None
  spec2, _ = _spec_and_tree()
  assert PermutationSpec.from_json(json.loads(json.dumps(spec2.to_json()))) == spec2
  perm = permute.random_permutation(spec2, jax.random.key(3))
  back = permutation_from_json(json.loads(json.dumps(permutation_to_json(perm))))
  for g in perm:
    np.testing.assert_array_equal(back[g], perm[g])


# Random specs and trees (from test_spec), checked against an oracle that
# tracks every entry: leaves hold their own flat index, so after a
# permutation each entry says where it came from.


def _index_tree(shapes):
  """Each leaf `arange(size).reshape(shape)`: every entry names its origin."""
  return jax.tree.map(lambda s: np.arange(math.prod(s.shape), dtype=np.int32).reshape(s.shape), shapes)


def _value_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _claims(spec, shapes):
  """`{(path, axis): [(group, outer, n, inner)]}` for every AxisRef."""
  out = {}
  leaves = tree_lib.leaves_by_path(shapes)
  for g, refs in spec.groups.items():
    for ref in refs:
      size = leaves[ref.path].shape[ref.axis]
      view, index = ref.factor if ref.factor else ((size,), 0)
      outer, n = math.prod(view[:index]), view[index]
      out.setdefault((ref.path, ref.axis), []).append((g, outer, n, size // (outer * n)))
  return out


@hypothesis.given(specs_and_shapes(), st.integers(0, 2**31 - 1))
def test_apply_gathers_every_claimed_component(spec_and_shapes, seed):
  spec, shapes = spec_and_shapes
  perm = permute.random_permutation(spec, jax.random.key(seed))
  v = _index_tree(shapes)
  out = permute.apply_permutation(spec, perm, v)
  claims = _claims(spec, shapes)
  moved_leaves = tree_lib.leaves_by_path(out)
  for path, leaf in tree_lib.leaves_by_path(v).items():
    moved = np.asarray(moved_leaves[path])
    assert moved.dtype == leaf.dtype and moved.shape == leaf.shape
    assert sorted(moved.ravel()) == list(range(leaf.size))  # a bijection of entries
    origin = np.unravel_index(moved, leaf.shape)  # per axis: where each entry came from
    for axis in range(leaf.ndim):
      new = np.indices(leaf.shape)[axis]
      old = origin[axis]
      rest_new, rest_old = new.copy(), old.copy()
      for g, outer, n, inner in claims.get((path, axis), []):
        unit_new, unit_old = (new // inner) % n, (old // inner) % n
        # Gathers: unit i of the result is unit perm[g][i] of the original.
        np.testing.assert_array_equal(unit_old, np.asarray(perm[g])[unit_new])
        rest_new -= unit_new * inner
        rest_old -= unit_old * inner
      np.testing.assert_array_equal(rest_new, rest_old)  # unclaimed components stay


@hypothesis.given(specs_and_shapes(), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_invert_compose_identity_on_random_specs(spec_and_shapes, seed_p, seed_q):
  spec, shapes = spec_and_shapes
  v = _value_tree(shapes)
  p = permute.random_permutation(spec, jax.random.key(seed_p))
  q = permute.random_permutation(spec, jax.random.key(seed_q))
  apply = lambda perm, tree: permute.apply_permutation(spec, perm, tree)  # noqa: E731

  def same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)

  inv = permute.invert_permutation(p)
  identity = permute.identity_permutation(spec)
  same(apply(identity, v), v)
  same(apply(inv, apply(p, v)), v)
  same(apply(p, apply(inv, v)), v)
  same(apply(permute.compose_permutations(p, q), v), apply(q, apply(p, v)))
  same(permute.compose_permutations(p, inv), identity)
  same(permute.compose_permutations(inv, p), identity)
  same(permute.invert_permutation(inv), p)
  r = permute.random_permutation(spec, jax.random.key(seed_p ^ seed_q))
  same(permute.compose_permutations(permute.compose_permutations(p, q), r),
       permute.compose_permutations(p, permute.compose_permutations(q, r)))


def test_random_permutation_is_deterministic_per_key():
  spec, _ = _spec_and_tree()
  a = permute.random_permutation(spec, jax.random.key(7))
  b = permute.random_permutation(spec, jax.random.key(7))
  c = permute.random_permutation(spec, jax.random.key(8))
  assert list(a) == list(spec.groups)
  for g, n in spec.sizes.items():
    assert a[g].dtype == jnp.int32 and sorted(np.asarray(a[g]).tolist()) == list(range(n))
    np.testing.assert_array_equal(a[g], b[g])
  assert any(not np.array_equal(a[g], c[g]) for g in spec.groups)
  one = PermutationSpec({"s": []}, {"s": 1})
  np.testing.assert_array_equal(permute.random_permutation(one, jax.random.key(0))["s"], [0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.uint32, np.bool_, np.complex64,
                                   jnp.bfloat16, "jax-float16", "jax-int32"])
def test_every_dtype_is_kept(dtype):
  spec, _ = _spec_and_tree()
  rng = np.random.default_rng(0)
  on_jax = isinstance(dtype, str)
  np_dtype = np.dtype(dtype.split("-")[1]) if on_jax else np.dtype(dtype)
  v = {"w1": (rng.standard_normal((3, 6)) * 10).astype(np_dtype),
       "b1": (rng.standard_normal(6) * 10).astype(np_dtype),
       "qkv": (rng.standard_normal((6, 8)) * 10).astype(np_dtype), "labels": np.arange(5)}
  if on_jax:
    v = {k: jnp.asarray(x) for k, x in v.items()}
  perm = permute.random_permutation(spec, jax.random.key(0))
  out = permute.apply_permutation(spec, perm, v)
  for k in v:
    assert out[k].dtype == v[k].dtype, k
  np.testing.assert_array_equal(np.asarray(out["w1"]), np.asarray(v["w1"])[:, np.asarray(perm["h"])])
  back = permute.apply_permutation(spec, permute.invert_permutation(perm), out)
  for k in v:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v[k]))


def test_under_jit_traced_permutations_are_checked_by_shape():
  spec, v = _spec_and_tree()
  perm = permute.identity_permutation(spec)
  f = jax.jit(lambda p, v: permute.apply_permutation(spec, p, v))
  with pytest.raises(ValueError, match=r"group 'h': expected int\[6\]"):
    f({**perm, "h": jnp.arange(5)}, v)
  with pytest.raises(ValueError, match=r"group 'h': expected int\[6\], got float32"):
    f({**perm, "h": jnp.arange(6.0)}, v)
  p = permute.random_permutation(spec, jax.random.key(2))
  np.testing.assert_array_equal(jax.jit(permute.invert_permutation)(p)["h"], permute.invert_permutation(p)["h"])


def test_more_bad_permutations_and_specs_are_refused():
  spec, v = _spec_and_tree()
  perm = permute.identity_permutation(spec)
  with pytest.raises(ValueError, match=r"missing groups \[\], unknown groups \['x'\]"):
    permute.apply_permutation(spec, {**perm, "x": np.arange(3)}, v)
  with pytest.raises(ValueError, match=r"group 'h': expected int\[6\], got float"):
    permute.apply_permutation(spec, {**perm, "h": np.arange(6.0)}, v)
  with pytest.raises(ValueError, match=r"group 'heads': expected int\[2\], got int\w*\[2, 1\]"):
    permute.apply_permutation(spec, {**perm, "heads": np.arange(2).reshape(2, 1)}, v)
  with pytest.raises(ValueError, match="group 'head_dim' is not a permutation of range\\(4\\)"):
    permute.apply_permutation(spec, {**perm, "head_dim": np.array([0, 1, 2, 4])}, v)
  with pytest.raises(ValueError, match="a permutation is a dict"):
    permute.apply_permutation(spec, [np.arange(6)], v)
  # The spec must fit the variables: checked before any gather.
  with pytest.raises(ValueError, match="w1 axis 1: size 5, group 'h' has 6"):
    permute.apply_permutation(spec, perm, {**v, "w1": np.zeros((3, 5), np.float32)})
  double = PermutationSpec({"h": [AxisRef(("w1",), 1)], "g": [AxisRef(("w1",), 1)]}, {"h": 6, "g": 6})
  with pytest.raises(ValueError, match="w1 axis 1 is claimed by groups 'h' and 'g'"):
    permute.apply_permutation(double, permute.identity_permutation(double), v)
  clash = PermutationSpec({"a": [AxisRef(("qkv",), 1, ((2, 4), 0))], "b": [AxisRef(("qkv",), 1, ((4, 2), 0))]},
                          {"a": 2, "b": 4})
  with pytest.raises(ValueError, match="qkv axis 1: incompatible factors"):
    permute.apply_permutation(clash, permute.identity_permutation(clash), v)
  with pytest.raises(ValueError, match="groups differ: \\['x'\\]"):
    permute.compose_permutations(perm, {**perm, "x": np.arange(2)})
  with pytest.raises(ValueError, match="group 'h' has shape \\(6,\\) in the first"):
    permute.compose_permutations(perm, {**perm, "h": np.arange(5)})
