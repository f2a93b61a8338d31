"""Tests for mergejax.permute and the spec checks it relies on."""

import json

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from mergejax import permute
from mergejax.spec import AxisRef, PermutationSpec, check_spec
from mergejax.spec import permutation_from_json, permutation_to_json


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
