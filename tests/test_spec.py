"""Tests for mergejax.spec: MergeLayout arithmetic, validation, JSON."""

import json
import math

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from mergejax.spec import AxisRef, GroupLayout, MergeLayout, PermutationSpec, round_half_up
from mergejax.spec import canonical_ref, check_spec, load_permutation, load_spec
from mergejax.spec import permutation_from_json, permutation_to_json
from mergejax.spec import save_permutation, save_spec

sizes_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 512), min_size=1)


@hypothesis.given(sizes_st, st.floats(0, 1))
def test_from_ratios_counts(sizes, r):
  layout = MergeLayout.from_ratios(sizes, r)
  for g, n in sizes.items():
    m, na, nb = layout[g]
    assert m == round_half_up(r * n)
    assert na == nb == n - m
    assert m + na == n  # each original model's units are all placed once
    assert n <= layout[g].width <= 2 * n


@hypothesis.given(sizes_st)
def test_ratio_one_is_identity_and_zero_keeps_both(sizes):
  assert MergeLayout.from_ratios(sizes, 1.0) == MergeLayout.identity(sizes)
  assert MergeLayout.from_ratios(sizes, 0.0).widths() == {g: 2 * n for g, n in sizes.items()}


def test_round_half_up_is_not_bankers():
  assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]


def test_per_group_ratios_default_to_one():
  layout = MergeLayout.from_ratios({"a": 10, "b": 10}, {"a": 0.3})
  assert layout["a"] == GroupLayout(3, 7, 7)
  assert layout["b"] == GroupLayout(10, 0, 0)


@hypothesis.given(sizes_st, st.floats(0, 1))
def test_json_round_trip(sizes, r):
  layout = MergeLayout.from_ratios(sizes, r)
  again = MergeLayout.from_json(json.loads(json.dumps(layout.to_json())))
  assert again == layout
  assert hash(again) == hash(layout)


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"a": (1, 2)}, "expected \\(n_merged, n_a, n_b\\)"),
        ({"a": (1, -1, 0)}, "non-negative ints"),
        ({"a": (1.5, 0, 0)}, "non-negative ints"),
        ({"a": (0, 0, 0)}, "width 0"),
    ],
)
def test_layout_rejects_bad_counts(groups, message):
  with pytest.raises(ValueError, match=message):
    MergeLayout(groups)


def test_from_ratios_rejects_bad_ratio_and_unknown_group():
  with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
    MergeLayout.from_ratios({"a": 4}, 1.5)
  with pytest.raises(ValueError, match="unknown groups: \\['z'\\]"):
    MergeLayout.from_ratios({"a": 4}, {"z": 0.5})


def test_layout_is_an_immutable_mapping():
  layout = MergeLayout({"a": (2, 1, 1)})
  assert dict(layout) == {"a": (2, 1, 1)}
  assert layout["a"].width == 4
  with pytest.raises(TypeError):
    layout["a"] = (1, 0, 0)


def test_permutation_spec_checks_groups_against_sizes():
  ref = AxisRef(("params", "Dense_0", "kernel"), 1)
  spec = PermutationSpec({"h": [ref, (("params", "Dense_1", "kernel"), 0)]}, {"h": 8})
  assert spec.groups["h"][1] == AxisRef(("params", "Dense_1", "kernel"), 0, None)
  with pytest.raises(ValueError, match="different groups"):
    PermutationSpec({"h": [ref]}, {"g": 8})
  with pytest.raises(ValueError, match="positive int"):
    PermutationSpec({"h": [ref]}, {"h": 0})


# PermutationSpec: canonical factors, equality, check_spec, JSON.


@pytest.mark.parametrize("factor, canonical", [
    (((4, 4, 32), 2), ((16, 32), 1)),
    (((4, 4, 32), 0), ((4, 128), 0)),
    (((4, 4, 32), 1), ((4, 4, 32), 1)),
    (((1, 8), 1), None),
    (((8, 1, 1), 0), None),
    (((1, 1, 5, 1), 2), None),
    (((2, 1, 3, 4), 2), ((2, 3, 4), 1)),
    (((3, 1, 4), 1), ((3, 1, 4), 1)),  # n is kept even where it is 1
    ([[4, 4, 32], 2], ((16, 32), 1)),  # as JSON gives it
    (None, None),
])
def test_factors_are_canonical(factor, canonical):
  ref = canonical_ref((["params", "k"], 1, factor))
  assert ref == AxisRef(("params", "k"), 1, canonical)
  spec = PermutationSpec({"g": [AxisRef(("params", "k"), 1, factor)]}, {"g": 2})
  assert spec.groups["g"] == (ref,)


@hypothesis.given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_canonical_factor_claims_the_same_units(shape, data):
  index = data.draw(st.integers(0, len(shape) - 1))
  ref = canonical_ref((("x",), 0, (tuple(shape), index)))
  outer, n, inner = math.prod(shape[:index]), shape[index], math.prod(shape[index + 1:])
  if ref.factor is None:
    assert outer == inner == 1
  else:
    view, i = ref.factor
    assert math.prod(view) == math.prod(shape) and view[i] == n
    assert (math.prod(view[:i]), math.prod(view[i + 1:])) == (outer, inner)
    assert 1 not in view[:i] + view[i + 1:]
  assert canonical_ref(ref) == ref


@pytest.mark.parametrize("ref, message", [
    (("params/k", 0), "path must be a tuple of key names"),
    ((("params", None), 0), "key None is not a name"),
    ((("params", "k"), -1), "params/k: axis must be a non-negative int"),
    ((("params", "k"), 1.0), "params/k: axis must be a non-negative int"),
    ((("params", "k"), 0, ((2, 3), 2)), "params/k axis 0: factor must be"),
    ((("params", "k"), 0, ((2, 0), 0)), "params/k axis 0: factor must be"),
    ((("params", "k"), 0, (6,)), "params/k axis 0: factor must be"),
    ((("params", "k"),), "an AxisRef is \\(path, axis"),
])
def test_malformed_refs_are_refused(ref, message):
  with pytest.raises(ValueError, match=message):
    PermutationSpec({"g": [ref]}, {"g": 2})


def test_sizes_accept_numpy_ints_and_refuse_bools():
  spec = PermutationSpec({"g": []}, {"g": np.int64(3)})
  assert spec.sizes == {"g": 3} and type(spec.sizes["g"]) is int
  with pytest.raises(ValueError, match="positive int"):
    PermutationSpec({"g": []}, {"g": True})


def test_equality_ignores_ref_order_but_not_names_or_sizes():
  a, b = AxisRef(("w1",), 1), AxisRef(("w2",), 0)
  spec = PermutationSpec({"h": [a, b], "o": []}, {"h": 4, "o": 2})
  same = PermutationSpec({"o": [], "h": [b, a]}, {"o": 2, "h": 4})
  assert spec == same and hash(spec) == hash(same)
  assert spec.names == ("h", "o") and same.names == ("o", "h")  # the user's names, in order
  assert spec != PermutationSpec({"x": [a, b], "o": []}, {"x": 4, "o": 2})
  assert spec != PermutationSpec({"h": [a, b], "o": []}, {"h": 4, "o": 3})
  assert spec != PermutationSpec({"h": [a], "o": [b]}, {"h": 4, "o": 2})
  # A factor spelled differently is the same claim.
  f1 = PermutationSpec({"h": [AxisRef(("w",), 0, ((2, 3, 4), 2))]}, {"h": 4})
  f2 = PermutationSpec({"h": [AxisRef(("w",), 0, ((6, 4), 1))]}, {"h": 4})
  assert f1 == f2


def _fit_tree():
  return {
      "params": {
          "hidden_0": {"kernel": np.zeros((3, 64), np.float32), "bias": np.zeros(64, np.float32)},
          "flat": {"kernel": np.zeros((24, 5), np.float32)},  # (2 * 3 * 4, 5)
      },
      "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((64,), np.float32)}},
  }


def _one(group, n, *refs):
  return PermutationSpec({group: list(refs)}, {group: n})


K, B, F = ("params", "hidden_0", "kernel"), ("params", "hidden_0", "bias"), ("params", "flat", "kernel")


def test_check_spec_accepts_what_fits():
  check_spec(PermutationSpec(
      {"hidden_0": [AxisRef(K, 1), AxisRef(B, 0), AxisRef(("batch_stats", "bn", "mean"), 0)],
       "a": [AxisRef(F, 0, ((2, 12), 0))],
       "c": [AxisRef(F, 0, ((6, 4), 1))],  # components 0 and 2 of the view (2, 3, 4)
       "b": [AxisRef(F, 0, ((2, 3, 4), 1))],
       "o": [AxisRef(F, 1)]},
      {"hidden_0": 64, "a": 2, "b": 3, "c": 4, "o": 5}), _fit_tree())


@pytest.mark.parametrize("spec, message", [
    (_one("hidden_0", 32, AxisRef(K, 1)), "^params/hidden_0/kernel axis 1: size 64, group 'hidden_0' has 32$"),
    (_one("g", 64, AxisRef(("params", "hidden_1", "kernel"), 1)), "group 'g': no variable params/hidden_1/kernel"),
    (_one("g", 64, AxisRef(("params", "hidden_0"), 1)), "group 'g': no variable params/hidden_0$"),
    (_one("g", 64, AxisRef(B, 1)), "group 'g': params/hidden_0/bias axis 1 out of range for shape \\(64,\\)"),
    (_one("g", 4, AxisRef(F, 0, ((5, 4), 1))), "params/flat/kernel axis 0: factor .* does not view size 24"),
    (_one("g", 3, AxisRef(F, 0, ((6, 4), 1))), "params/flat/kernel axis 0: factor .* with 3 units"),
    (PermutationSpec({"a": [AxisRef(K, 1)], "b": [AxisRef(K, 1)]}, {"a": 64, "b": 64}),
     "params/hidden_0/kernel axis 1 is claimed by groups 'a' and 'b'"),
    (_one("a", 64, AxisRef(K, 1), AxisRef(K, 1)), "params/hidden_0/kernel axis 1 is claimed by groups 'a' and 'a'"),
    (PermutationSpec({"a": [AxisRef(F, 0)], "b": [AxisRef(F, 0, ((6, 4), 1))]}, {"a": 24, "b": 4}),
     "params/flat/kernel axis 0 is claimed by groups 'a' and 'b'"),
    (PermutationSpec({"a": [AxisRef(F, 0, ((6, 4), 1))], "b": [AxisRef(F, 0, ((3, 2, 4), 2))]},
                     {"a": 4, "b": 4}), "params/flat/kernel axis 0 is claimed by groups 'a' and 'b'"),
    (PermutationSpec({"a": [AxisRef(F, 0, ((4, 6), 0))], "b": [AxisRef(F, 0, ((2, 3, 4), 2))]},
                     {"a": 4, "b": 4}), "params/flat/kernel axis 0: incompatible factors"),
    (PermutationSpec({"a": [AxisRef(F, 0, ((2, 12), 0))], "b": [AxisRef(F, 0, ((4, 6), 0))]},
                     {"a": 2, "b": 4}), "params/flat/kernel axis 0: incompatible factors"),
])
def test_check_spec_names_what_does_not_fit(spec, message):
  with pytest.raises(ValueError, match=message):
    check_spec(spec, _fit_tree())


@st.composite
def specs_and_shapes(draw, max_groups=4):
  """A random PermutationSpec and a tree of shapes it fits.

  Leaves have 1 to 3 axes; each axis is fixed, a whole group, or a view of 2
  or 3 components (each fixed or a group of more than one unit, a group
  possibly twice).
  """
  names = [f"g{i}" for i in range(draw(st.integers(1, max_groups)))]
  sizes = {g: draw(st.integers(1, 4), label=g) for g in names}
  groups = {g: [] for g in names}
  shapes = {}
  for leaf in range(draw(st.integers(1, 4))):
    path = ("params", f"layer_{leaf}", "w")
    shape = []
    for axis in range(draw(st.integers(1, 3))):
      kind = draw(st.sampled_from(["fixed", "whole", "view"]))
      if kind == "fixed":
        shape.append(draw(st.integers(1, 3)))
      elif kind == "whole":
        g = draw(st.sampled_from(names))
        groups[g].append(AxisRef(path, axis))
        shape.append(sizes[g])
      else:
        wide = [g for g in names if sizes[g] > 1]  # a size-1 component claims nothing
        groups_st = st.sampled_from(wide) if wide else st.nothing()
        parts = draw(st.lists(st.one_of(st.integers(1, 3), groups_st), min_size=2, max_size=3))
        view = tuple(sizes[p] if isinstance(p, str) else p for p in parts)
        for index, p in enumerate(parts):
          if isinstance(p, str):
            groups[p].append(AxisRef(path, axis, (view, index)))
        shape.append(math.prod(view))
    shapes[path] = tuple(shape)
  shapes[("params", "untouched")] = (2, 3)
  tree = {}
  for path, shape in shapes.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
  return PermutationSpec(groups, sizes), tree


@hypothesis.given(specs_and_shapes())
def test_random_specs_fit_and_round_trip_through_json(spec_and_shapes):
  spec, shapes = spec_and_shapes
  check_spec(spec, shapes)
  text = json.dumps(spec.to_json())
  again = PermutationSpec.from_json(json.loads(text))
  assert again == spec
  assert again.names == spec.names and again.groups == spec.groups  # order kept too
  assert json.dumps(again.to_json()) == text  # deterministic


def test_spec_and_permutation_files(tmp_path):
  spec = PermutationSpec({"b": [AxisRef(F, 0, ((2, 3, 4), 1))], "a": [AxisRef(K, 1), AxisRef(B, 0)]},
                         {"b": 3, "a": 64})
  save_spec(tmp_path / "spec.json", spec)
  loaded = load_spec(tmp_path / "spec.json")
  assert loaded == spec and loaded.names == ("b", "a")
  assert loaded.groups["b"][0].factor == ((2, 3, 4), 1)
  perm = {"b": jax.numpy.array([2, 0, 1]), "a": np.arange(64)[::-1]}
  save_permutation(str(tmp_path / "perm.json"), perm)
  back = load_permutation(tmp_path / "perm.json")
  assert list(back) == ["b", "a"] and all(back[g].dtype == np.int32 for g in back)
  np.testing.assert_array_equal(back["b"], [2, 0, 1])
  np.testing.assert_array_equal(back["a"], np.arange(64)[::-1])
  assert permutation_from_json(json.loads(json.dumps(permutation_to_json(perm))))["b"].tolist() == [2, 0, 1]


@pytest.mark.parametrize("data, message", [
    ({"groups": {}}, "keys \\['groups', 'sizes'\\]"),
    ([1, 2], "keys \\['groups', 'sizes'\\], got list"),
    ({"groups": [], "sizes": {}}, "maps group names"),
    ({"groups": {"a": [[["w"], 0, [[2, 3], 5]]]}, "sizes": {"a": 2}}, "w axis 0: factor must be"),
])
def test_bad_spec_json_is_refused(data, message):
  with pytest.raises(ValueError, match=message):
    PermutationSpec.from_json(data)
